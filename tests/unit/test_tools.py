"""Tools the tests and the control-plane build need are found where the project installs
them, whatever ``PATH`` the suite runs with (issue 9, item 1: ``make test`` ran
``venv/bin/python -m pytest`` without the venv's ``bin/`` on ``PATH``, and hadolint was
"missing" on a fresh machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from costwarden.cluster.binaries import find_tool

ROOT = Path(__file__).resolve().parents[2]
# What a fresh machine's PATH surely holds; the Makefile's SYSTEM_PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV_BIN = Path(sys.executable).parent


def test_the_makefile_runs_the_suite_with_a_reduced_path() -> None:
    makefile = (ROOT / "Makefile").read_text()

    assert f"SYSTEM_PATH := {SYSTEM_PATH}" in makefile
    assert "\t$(SUITE) $(PY) -m pytest tests\n" in makefile


@pytest.mark.parametrize("tool", ["hadolint", "costwarden", "ruff"])
def test_console_scripts_of_the_install_are_found_without_path(tool: str) -> None:
    if not (VENV_BIN / tool).exists():
        pytest.fail(f"{tool} is not in {VENV_BIN}: run the suite as `make test` does")

    assert find_tool(tool, {"PATH": "/nonexistent"}) == VENV_BIN / tool


def test_a_test_needing_hadolint_passes_with_only_the_system_path() -> None:
    """The check that would have caught item 1: pytest as a fresh machine's shell runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "PYTEST_ADDOPTS")}
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/unit/test_dockerfile.py::test_hadolint_reports_nothing",
        ],
        cwd=ROOT, env={**env, "PATH": SYSTEM_PATH},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout


def _fake_tool(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_go_is_found_outside_path(tmp_path: Path) -> None:
    go = _fake_tool(tmp_path / "sdk" / "bin", "go")

    assert find_tool("go", {"PATH": "/nonexistent", "COSTWARDEN_GO": str(go)}) == go
    assert find_tool("go", {"PATH": "/nonexistent", "GOROOT": str(tmp_path / "sdk")}) == go


def test_path_is_searched_after_the_venv(tmp_path: Path) -> None:
    tool = _fake_tool(tmp_path / "bin", "cw-no-such-tool-anywhere")

    assert find_tool(tool.name, {"PATH": str(tmp_path / "bin")}) == tool
    assert find_tool(tool.name, {"PATH": "/nonexistent"}) is None
