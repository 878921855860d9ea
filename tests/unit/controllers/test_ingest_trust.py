"""The operator's view of pods for ingestion: cached, uid-checked, remembered after deletion."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from costwarden.controllers.ingest_trust import PodView, TransientError
from costwarden.controllers.rest import ApiError


class FakePods:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.reads = 0
        self.failing = False

    async def get(self, path: str, params: Any = None) -> dict[str, Any]:
        self.reads += 1
        if self.failing:
            raise ApiError(500, "GET", path, b"")
        name = path.rsplit("/", 1)[-1]
        if name not in self.pods:
            raise ApiError(404, "GET", path, b"")
        return self.pods[name]


def pod(name: str, uid: str, owner: str = "job-1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name, "namespace": "ns", "uid": uid, "labels": {"team": "a"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": owner,
                                 "uid": "j", "controller": True}],
        }
    }  # fmt: skip


def test_pods_are_read_once_then_cached_and_reread_for_another_uid():
    fake = FakePods()
    fake.pods["p"] = pod("p", "u1")
    view = PodView(fake)  # type: ignore[arg-type]

    async def run() -> None:
        first = await view.get("ns", "p", "u1")
        assert first is not None
        assert (first.uid, first.job, dict(first.labels)) == ("u1", "job-1", {"team": "a"})
        assert await view.get("ns", "p", "u1") == first
        assert fake.reads == 1
        fake.pods["p"] = pod("p", "u2")  # deleted and created again under the same name
        again = await view.get("ns", "p", "u2")
        assert again is not None
        assert again.uid == "u2"
        assert fake.reads == 2

    asyncio.run(run())


def test_a_deleted_pod_is_remembered_for_gateways_but_unknown_pods_are_none():
    fake = FakePods()
    fake.pods["p"] = pod("p", "u1")
    view = PodView(fake)  # type: ignore[arg-type]

    async def run() -> None:
        assert await view.get("ns", "p") is not None
        del fake.pods["p"]
        view._pods[("ns", "p")] = (view._pods[("ns", "p")][0] - 60, view._pods[("ns", "p")][1])
        assert await view.get("ns", "p") is not None  # its last calls still count
        assert await view.get("ns", "p", "u1") is not None  # its own sidecar's too
        assert await view.get("ns", "p", "u9") is None  # another incarnation must exist
        assert await view.get("ns", "never") is None

    asyncio.run(run())


def test_an_api_server_error_is_transient_never_a_refusal():
    fake = FakePods()
    fake.failing = True
    view = PodView(fake)  # type: ignore[arg-type]
    with pytest.raises(TransientError):
        asyncio.run(view.get("ns", "p"))
