"""Which namespaces hold the sidecars' configuration copy, against a fake core API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.controllers.config_copies import ConfigCopies
from costwarden.policy.injection import CONFIG_COPY_NAME
from costwarden.policy.render import serialize
from costwarden.testing.gateway import sample_config

OLD = datetime.now(UTC) - timedelta(hours=1)


class FakeCore:
    def __init__(
        self,
        opted_in: list[str],
        copies: dict[str, tuple[dict[str, str], datetime]],
        injected_pods: set[str],
        source: dict[str, str] | None = None,
    ) -> None:
        self.opted_in = opted_in
        self.copies = copies
        self.injected_pods = injected_pods
        self.source = source
        self.writes: list[tuple[str, str]] = []

    def list_namespace(self, label_selector: str) -> Any:
        assert label_selector == "costwarden.io/inject=enabled"
        return SimpleNamespace(items=[_meta(name=n) for n in self.opted_in])

    def list_config_map_for_all_namespaces(self, field_selector: str, label_selector: str) -> Any:
        assert field_selector == f"metadata.name={CONFIG_COPY_NAME}"
        return SimpleNamespace(
            items=[
                client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(
                        namespace=ns, name=CONFIG_COPY_NAME, creation_timestamp=created,
                        resource_version="1",
                    ),
                    data=data,
                )
                for ns, (data, created) in self.copies.items()
            ]
        )  # fmt: skip

    def list_namespaced_pod(self, namespace: str, label_selector: str, limit: int) -> Any:
        return SimpleNamespace(items=[object()] if namespace in self.injected_pods else [])

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        if name == "source" and self.source is not None:
            return client.V1ConfigMap(metadata=client.V1ObjectMeta(), data=self.source)
        if name == CONFIG_COPY_NAME and namespace in self.copies:
            return object()
        raise ApiException(status=404)

    def create_namespaced_config_map(self, namespace: str, body: client.V1ConfigMap) -> None:
        self.writes.append(("create", namespace))
        self.copies[namespace] = (body.data, datetime.now(UTC))

    def replace_namespaced_config_map(self, name: str, namespace: str, body: Any) -> None:
        self.writes.append(("replace", namespace))

    def delete_namespaced_config_map(self, name: str, namespace: str) -> None:
        self.writes.append(("delete", namespace))


def _meta(name: str) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(name=name))


def _copies(core: FakeCore) -> ConfigCopies:
    return ConfigCopies(core, "costwarden-system", "source", frozenset({"kube-system"}))  # type: ignore[arg-type]


DATA = {"gateway-config.json": serialize(GatewayConfig())}


def test_sync_creates_updates_and_removes_copies() -> None:
    core = FakeCore(
        opted_in=["new", "current", "stale", "kube-system"],
        copies={
            "current": (DATA, OLD),
            "stale": ({"gateway-config.json": "{}"}, OLD),
            "abandoned": (DATA, OLD),
            "pods-left": (DATA, OLD),
            "just-made": (DATA, datetime.now(UTC)),
        },
        injected_pods={"pods-left"},
    )
    asyncio.run(_copies(core).sync(DATA, "r1"))
    assert sorted(core.writes) == [("create", "new"), ("delete", "abandoned"), ("replace", "stale")]


def test_ensure_creates_a_missing_copy_from_the_source_once() -> None:
    core = FakeCore(opted_in=[], copies={}, injected_pods=set(), source=DATA)
    copies = _copies(core)
    asyncio.run(copies.ensure("team-a"))
    asyncio.run(copies.ensure("team-a"))
    asyncio.run(copies.ensure("costwarden-system"))
    assert core.writes == [("create", "team-a")]


def test_ensure_before_the_source_exists_leaves_it_to_the_next_pass() -> None:
    core = FakeCore(opted_in=[], copies={}, injected_pods=set(), source=None)
    copies = _copies(core)
    asyncio.run(copies.ensure("team-a"))
    assert core.writes == []
    asyncio.run(copies.sync(DATA, "r1"))
    assert core.writes == [("create", "team-a")]


def _two_teams() -> str:
    one = sample_config("http://upstream", namespaces=["team-a"])
    team, policy = one.teams[0], one.policies[0]
    other_policy = policy.model_copy(update={"id": "team-b/routing"})
    other = team.model_copy(
        update={"id": "team-b/budget", "namespaces": ["team-b"], "routing_policy": "team-b/routing"}
    )
    return serialize(one.model_copy(update={"teams": [team, other],
                                            "policies": [policy, other_policy]}))  # fmt: skip


def test_each_copy_holds_only_its_own_namespace_s_teams_and_policies() -> None:
    core = FakeCore(opted_in=["team-a", "team-b", "nobody"], copies={}, injected_pods=set())
    copies = _copies(core)
    copies.ingest_ca = "-----BEGIN CERTIFICATE-----\n"
    asyncio.run(copies.sync({"gateway-config.json": _two_teams()}, "r1"))
    seen = {}
    for namespace, (data, _) in core.copies.items():
        config = GatewayConfig.model_validate_json(data["gateway-config.json"])
        seen[namespace] = ([t.id for t in config.teams], [p.id for p in config.policies])
        assert data["ingest-ca.crt"] == copies.ingest_ca
    team_a = sample_config("http://upstream").teams[0]
    assert seen == {
        "team-a": ([team_a.id], [team_a.routing_policy]),
        "team-b": (["team-b/budget"], ["team-b/routing"]),
        "nobody": ([], []),
    }
