"""The lean Job watch survives what a real connection throws at it (issue 13)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from costwarden.controllers import jobwatch


class FlakyRest:
    """LIST answers at once; the first WATCH drops the connection, the second delivers."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure
        self.watches = 0

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": "1"}, "items": []}

    async def watch(
        self, path: str, params: dict[str, str], timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        self.watches += 1
        if self.watches == 1:
            raise self.failure
        yield {"type": "ADDED", "object": {"metadata": {"name": "j", "resourceVersion": "2"}}}
        await asyncio.Event().wait()  # an idle watch


@pytest.mark.parametrize(
    "failure",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("truncated"),
        RuntimeError("handler bug"),
    ],
    ids=["server-disconnected", "payload-error", "any-exception"],
)
def test_the_watch_resumes_after_a_dropped_connection(
    failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobwatch.asyncio, "sleep", _no_wait)
    seen: list[str] = []

    async def handle(kind: str, obj: dict[str, Any]) -> None:
        seen.append(kind)

    async def main() -> None:
        rest = FlakyRest(failure)
        task = asyncio.create_task(jobwatch.watch_jobs(rest, handle))  # type: ignore[arg-type]
        for _ in range(200):
            if seen:
                break
            await _yield_once()
        task.cancel()
        assert rest.watches == 2

    asyncio.run(main())
    assert seen == ["ADDED"]


_real_sleep = asyncio.sleep


async def _no_wait(delay: float) -> None:
    await _real_sleep(0)


async def _yield_once() -> None:
    await _real_sleep(0.001)
