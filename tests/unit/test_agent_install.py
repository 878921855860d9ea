"""The e2e suite's agent installer (tests/support/agents.py): npm runs only for what is
missing or at another version than pinned, and an install that leaves a pin missing fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import agents
from tests.support.agents import BINARIES, NPM_PINS, AgentInstallError, install_agents


def place(prefix: Path, package: str, version: str) -> None:
    """What ``npm install --prefix`` leaves: the package's manifest and its bin link."""
    manifest = prefix / "node_modules" / package / "package.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"name": package, "version": version}))
    binary = prefix / "node_modules" / ".bin" / BINARIES[package]
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\n")


@pytest.fixture
def npm_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The specs each npm install was asked for; the fake npm installs them as asked."""
    runs: list[list[str]] = []

    def fake_npm(prefix: Path, specs: list[str]) -> None:
        runs.append(specs)
        for spec in specs:
            package, _, version = spec.rpartition("@")
            place(prefix, package, version)

    monkeypatch.setattr(agents, "_npm_install", fake_npm)
    return runs


def test_installs_every_pinned_agent_once_and_reuses_them(
    tmp_path: Path, npm_runs: list[list[str]]
) -> None:
    found = install_agents(tmp_path)
    assert npm_runs == [[f"{p}@{v}" for p, v in NPM_PINS.items()]]
    assert {p: path.name for p, path in found.items()} == BINARIES
    install_agents(tmp_path)
    assert len(npm_runs) == 1


def test_reinstalls_only_an_agent_at_another_version(
    tmp_path: Path, npm_runs: list[list[str]]
) -> None:
    (first, pinned), (second, _) = list(NPM_PINS.items())
    place(tmp_path, first, pinned)
    place(tmp_path, second, "0.0.1")
    install_agents(tmp_path)
    assert npm_runs == [[f"{second}@{NPM_PINS[second]}"]]


def test_an_install_that_leaves_a_pin_missing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "_npm_install", lambda prefix, specs: None)
    with pytest.raises(AgentInstallError, match="missing"):
        install_agents(tmp_path)
