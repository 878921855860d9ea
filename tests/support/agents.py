"""The real coding agents the e2e suite drives through the gateway, and what they called.

Claude Code and Codex CLI come from npm at pinned versions, installed once into
``<cache>/agents`` (``~/.cache/costwarden/agents``) with ``npm install --prefix`` under a
file lock and reused while the pins do not change; the OpenAI Agents SDK is the
``openai-agents`` package of the test extra (pyproject.toml). Bump a pin here and in
docs/agents.md together.

:class:`RouteLog` sits between an agent and the gateway and records every request the
agent sends (method, path with query, status): the routes an agent uses, including the
ones the gateway does not serve (those never reach the upstream's log).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from costwarden.cluster.binaries import cache_root, find_tool
from costwarden.testing.threads import ServerThread

CLAUDE_CODE = "@anthropic-ai/claude-code"
CODEX = "@openai/codex"
NPM_PINS = {CLAUDE_CODE: "2.1.332", CODEX: "0.171.0"}
"""npm packages and the versions tested (docs/agents.md lists the same)."""
OPENAI_AGENTS_VERSION = "0.24.0"
"""The ``openai-agents`` pin of pyproject.toml's test extra."""
BINARIES = {CLAUDE_CODE: "claude", CODEX: "codex"}
INSTALL_TIMEOUT = 600


class AgentInstallError(RuntimeError):
    """npm could not install an agent (no npm, no registry, a failed postinstall)."""


def agents_dir() -> Path:
    return cache_root() / "agents"


def installed_version(prefix: Path, package: str) -> str | None:
    manifest = prefix / "node_modules" / package / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def _binary(prefix: Path, package: str) -> Path:
    return prefix / "node_modules" / ".bin" / BINARIES[package]


def _missing(prefix: Path) -> list[str]:
    return [
        f"{package}@{version}"
        for package, version in NPM_PINS.items()
        if installed_version(prefix, package) != version or not _binary(prefix, package).exists()
    ]


def install_agents(prefix: Path | None = None) -> dict[str, Path]:
    """The pinned agents' executables by package, installing what is missing or outdated.

    ``npm install --prefix <cache>/agents <pkg>@<version>...``; concurrent test runs wait
    for each other on ``<cache>/agents.lock``. A second call finds them installed."""
    prefix = prefix or agents_dir()
    prefix.mkdir(parents=True, exist_ok=True)
    with _locked(prefix.with_suffix(".lock")):
        missing = _missing(prefix)
        if missing:
            _npm_install(prefix, missing)
        if still := _missing(prefix):
            raise AgentInstallError(f"npm install left {still} missing in {prefix}")
    return {package: _binary(prefix, package) for package in NPM_PINS}


SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _npm_install(prefix: Path, specs: list[str]) -> None:
    npm = find_tool("npm") or (Path(found) if (found := shutil.which("npm")) else None)
    if npm is None:
        raise AgentInstallError("npm is not installed (Node.js 20+ with npm is needed)")
    command = [
        str(npm), "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
        "--no-update-notifier", "--save-exact", *specs,
    ]  # fmt: skip
    # npm runs node from PATH (the bin of npm's own node comes first).
    path = os.pathsep.join([str(npm.resolve().parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path}
    # Node trusts only its bundled CAs: where the environment names no extra ones, add the
    # system's bundle (what pip and curl trust here), so a registry behind a private CA
    # works with an empty environment too.
    if "NODE_EXTRA_CA_CERTS" not in env and Path(SYSTEM_CA_BUNDLE).is_file():
        env["NODE_EXTRA_CA_CERTS"] = SYSTEM_CA_BUNDLE
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env
    )  # fmt: skip
    if done.returncode != 0:
        raise AgentInstallError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class RouteLog:
    """A recording pass-through proxy in front of ``target`` (the gateway)."""

    target: str
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    """(method, path with query string, status) of every request, in order."""
    _server: ServerThread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def routes(self) -> list[str]:
        """Distinct ``METHOD /path?query -> status`` lines, in first-seen order."""
        return list(dict.fromkeys(f"{m} {p} -> {s}" for m, p, s in self.seen))

    def __enter__(self) -> RouteLog:
        self._server = ServerThread(self._app).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.__exit__(*exc)

    async def _app(self) -> web.Application:
        session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)

        async def forward(request: web.Request) -> web.StreamResponse:
            return await self._forward(session, request)

        app.router.add_route("*", "/{tail:.*}", forward)

        async def close(_: web.Application) -> None:
            await session.close()

        app.on_cleanup.append(close)
        return app

    async def _forward(
        self, session: aiohttp.ClientSession, request: web.Request
    ) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        body = await request.read()
        async with session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body
        ) as upstream:
            self.seen.append((request.method, request.path_qs, upstream.status))
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    response.headers[name] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
