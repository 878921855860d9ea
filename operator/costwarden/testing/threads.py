"""Run an aiohttp application or low-level server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

_T = TypeVar("_T")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, as the gateway runs in production."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a declared dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ServerThread:
    """Runs an aiohttp application on ``host`` (127.0.0.1) in a thread with its own event
    loop.

    Tests use it to drive real sockets with the synchronous SDKs from the test thread.
    """

    def __init__(
        self,
        make_app: Callable[[], Awaitable[web.Application | web.Server] | web.Application],
        *,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        url_host: str | None = None,
        host: str = "127.0.0.1",
    ):
        """``port`` 0 picks a free one (a fixed one lets a test restart a server in place);
        ``host`` is the address it listens on (a process kubelet's pods reach the host at
        its bridge address), ``url_host`` the name :attr:`url` gives (default: ``host``)."""
        self._make_app = make_app
        self._ssl_context = ssl_context
        self._host = host
        self._url_host = url_host or host
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.BaseRunner | None = None
        self.port = port

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._url_host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        made = self._make_app()
        app = made if isinstance(made, web.Application) else await made
        self._runner = (
            web.AppRunner(app, access_log=None)
            if isinstance(app, web.Application)
            else web.ServerRunner(app)
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def after_cleanup(self) -> None:
        """Subclasses release what the server used (called in the loop, after cleanup)."""

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
            self._runner = None
            self.call(self.after_cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
