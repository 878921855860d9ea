"""Who may report usage: a shared token, or an allowed service account (TokenReview)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from costwarden.controllers.ingest_auth import IngestAuth


class FakeReviews:
    """TokenReview: token ``sa-<ns>-<name>`` is that service account; others unknown."""

    def __init__(self) -> None:
        self.reviews = 0

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews += 1
        token = body["spec"]["token"]
        if not token.startswith("sa-"):
            return {"status": {"authenticated": False}}
        _, namespace, name = token.split("-", 2)
        user = f"system:serviceaccount:{namespace}:{name}"
        return {"status": {"authenticated": True, "user": {"username": user}}}


def check(auth: IngestAuth, header: str) -> int:
    return asyncio.run(auth.check(header)).status


def test_shared_token_from_a_file(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("old\nnew\n")
    auth = IngestAuth(token_file=token_file)
    assert check(auth, "Bearer new") == 200
    assert check(auth, "Bearer wrong") == 401
    assert check(auth, "") == 401
    assert check(auth, "Basic new") == 401
    token_file.write_text("rotated\n")
    assert check(auth, "Bearer new") == 401  # a rotated Secret applies at once


def test_service_accounts_are_reviewed_and_must_be_allowed():
    reviews = FakeReviews()
    auth = IngestAuth(allowed_service_accounts=["cw:gateway"], rest=reviews)  # type: ignore[arg-type]
    assert check(auth, "Bearer sa-cw-gateway") == 200
    assert check(auth, "Bearer sa-team-agent") == 403  # a workload, not a gateway
    assert check(auth, "Bearer garbage") == 401
    assert check(auth, "Bearer sa-cw-gateway") == 200
    assert reviews.reviews == 3  # the verdict is cached


def test_gateway_tokens_are_reviewed_for_the_ingest_audience_only():
    """The API server refuses a token minted for another audience; asking for
    costwarden.io/ingest is what makes the gateway's default token (or a token for the
    gateway's own audience) worthless here."""
    reviews = FakeReviews()
    audiences: list[Any] = []
    post = reviews.post

    async def recording(path: str, body: dict[str, Any]) -> dict[str, Any]:
        audiences.append(body["spec"].get("audiences"))
        return await post(path, body)

    reviews.post = recording  # type: ignore[method-assign]
    auth = IngestAuth(allowed_service_accounts=["cw:gateway"], rest=reviews)  # type: ignore[arg-type]
    assert check(auth, "Bearer sa-cw-gateway") == 200
    assert audiences == [["costwarden.io/ingest"]]


class FakeSidecarReviews:
    """TokenReview of pod-bound tokens: ``pod-<ns>-<name>-<uid>``; audience-bound reviews only."""

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        token = body["spec"]["token"]
        if not token.startswith("pod-") or not body["spec"].get("audiences"):
            return {"status": {"authenticated": False}}
        _, namespace, name, *uid = token.split("-")
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/pod-name": [name]}
        if uid:
            extra["authentication.kubernetes.io/pod-uid"] = uid
        user = {"username": f"system:serviceaccount:{namespace}:agent", "extra": extra}
        return {"status": {"authenticated": True, "user": user}}


def test_reporters_are_named_by_what_their_credential_proves(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("shared\n")
    auth = IngestAuth(
        token_file=token_file, allowed_service_accounts=["cw:gateway"],
        rest=FakeReviews(), allow_sidecars=False,  # type: ignore[arg-type]
    )  # fmt: skip
    assert asyncio.run(auth.check("Bearer shared")).reporter.identity == "token:shared"
    assert asyncio.run(auth.check("Bearer sa-cw-gateway")).reporter.identity == "sa:cw/gateway"
    sidecars = IngestAuth(rest=FakeSidecarReviews(), allow_sidecars=True)  # type: ignore[arg-type]
    verdict = asyncio.run(sidecars.check("Bearer pod-team-p1-u1"))
    assert verdict.status == 200
    reporter = verdict.reporter
    assert (reporter.identity, reporter.namespace, reporter.pod, reporter.pod_uid) == (
        "pod:team/p1/u1", "team", "p1", "u1",
    )  # fmt: skip
    assert reporter.cursor_key("p1/abcd") == "pod:team/p1/u1#p1/abcd"
    # A token that names its pod but not the pod's uid is not accepted as a sidecar's.
    assert asyncio.run(sidecars.check("Bearer pod-team-p1")).status == 403
