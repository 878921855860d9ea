"""Caller identity: sidecar (downward API), per-team keys, never a header the caller picks."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from costwarden.gateway.config import compile_config
from costwarden.gateway.identity import (
    Caller,
    SharedIdentifier,
    SidecarIdentifier,
    UnattributedError,
    parse_labels_file,
    resolve_team,
)
from costwarden.testing.gateway import NAMESPACE, TEAM_ID, sample_config

LABELS = 'app="agent"\nbatch.kubernetes.io/job-name="nightly-7"\nnote="a \\"quoted\\" value"\n'


def identify(identifier: object, headers: dict[str, str]) -> Caller:
    return asyncio.run(identifier.identify(headers))  # type: ignore[attr-defined]


def test_labels_file_is_parsed_like_the_downward_api_writes_it() -> None:
    labels = parse_labels_file(LABELS)

    assert labels == {
        "app": "agent",
        "batch.kubernetes.io/job-name": "nightly-7",
        "note": 'a "quoted" value',
    }


def test_sidecar_identity_comes_from_env_and_labels_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = tmp_path / "labels"
    labels.write_text(LABELS)
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("POD_NAME", "nightly-7-abcde")

    caller = identify(SidecarIdentifier.from_env(labels), {"Authorization": "Bearer whatever"})

    assert (caller.via, caller.namespace, caller.pod, caller.job) == (
        "sidecar", NAMESPACE, "nightly-7-abcde", "nightly-7",
    )  # fmt: skip
    config = compile_config(sample_config("http://x"), b"")
    team = resolve_team(caller, config)
    assert team is not None
    assert team.id == TEAM_ID


def test_sidecar_without_pod_env_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("POD_NAME", raising=False)

    with pytest.raises(ValueError, match="POD_NAMESPACE"):
        SidecarIdentifier.from_env(None)


def test_job_name_falls_back_to_the_legacy_label() -> None:
    caller = identify(SidecarIdentifier("ns", "p", None, labels={"job-name": "old"}), {})

    assert caller.job == "old"
    assert caller.unit == "old"


def keys_file(tmp_path: Path, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"{digest}: {TEAM_ID}\n"
        f"{hashlib.sha256(b'ci-key').hexdigest()}: {{team: {TEAM_ID}, job: ci}}\n"
    )
    return path


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
def test_team_key_by_sha256(tmp_path: Path, header: str) -> None:
    identifier = SharedIdentifier(keys_file(tmp_path, "cw-team-a-key"), None)
    value = "Bearer cw-team-a-key" if header == "Authorization" else "cw-team-a-key"

    caller = identify(identifier, {header: value})

    assert (caller.via, caller.team_id, caller.namespace) == ("key", TEAM_ID, "team-a")


def test_team_key_entry_may_name_the_job(tmp_path: Path) -> None:
    identifier = SharedIdentifier(keys_file(tmp_path, "x"), None)

    assert identify(identifier, {"x-api-key": "ci-key"}).job == "ci"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer unknown"},
        {"X-Costwarden-Team": TEAM_ID},
        {"x-api-key": "a.b.c"},
    ],
)
def test_anything_else_is_unattributed(tmp_path: Path, headers: dict[str, str]) -> None:
    identifier = SharedIdentifier(keys_file(tmp_path, "cw-team-a-key"), None)

    with pytest.raises(UnattributedError):
        identify(identifier, headers)


def test_a_caller_is_attributed_to_its_namespaces_own_team_never_to_a_foreign_one() -> None:
    own = sample_config("http://upstream").teams[0]
    # A team elsewhere whose id sorts first and which (by consent) also governs NAMESPACE.
    foreign = own.model_copy(update={"id": "aaa/platform", "namespaces": ["aaa", NAMESPACE]})
    config = sample_config("http://upstream").model_copy(update={"teams": [foreign, own]})
    compiled = compile_config(config, b"{}")
    caller = Caller("token", NAMESPACE, "pod", "", {})
    team = resolve_team(caller, compiled)
    assert team is not None
    assert team.id == TEAM_ID
    assert resolve_team(Caller("token", "elsewhere", "pod", "", {}), compiled) is None
    assert resolve_team(Caller("token", "aaa", "pod", "", {}), compiled).id == "aaa/platform"
