"""Gateway fixtures: a fake upstream and gateways on real 127.0.0.1 sockets, in threads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.gateway.sinks import MemorySink
from costwarden.testing.gateway import GatewayThread, sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``probe`` until truthy; fail at the deadline (no sleeps as synchronization)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or probe}")


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def upstream(fake: FakeUpstream) -> Iterator[ServerThread]:
    with ServerThread(fake.app) as server:
        yield server


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    return write_credentials(tmp_path / "credentials")


StartGateway = Callable[..., GatewayThread]


@pytest.fixture
def start_gateway(upstream: ServerThread, credentials_dir: Path) -> Iterator[StartGateway]:
    """Start a gateway (sample config by default, team fields overridable)."""
    started: list[GatewayThread] = []

    def start(config: GatewayConfig | None = None, **kwargs: Any) -> GatewayThread:
        team = kwargs.pop("team", {})
        config = config or sample_config(upstream.url, **team)
        kwargs.setdefault("credentials_dir", credentials_dir)
        gateway = GatewayThread(config, **kwargs).__enter__()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayThread:
    return start_gateway()


@pytest.fixture
def client(gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        yield http


def records(gateway: GatewayThread) -> MemorySink:
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    return sink


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGE = {
    "model": "claude-fake-sonnet",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello there"}],
}
