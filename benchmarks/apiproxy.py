"""A counting proxy in front of the API server: every request one client makes, by verb.

The operator under test is given a kubeconfig pointing here (plain HTTP on 127.0.0.1);
the proxy forwards with the control plane's admin credentials and counts each request,
watches included (a watch is one request however long it streams). That isolates the
operator's own API traffic from the controller manager's and the benchmark's.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes import config

from costwarden.controllers.rest import _ssl_context

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class CountingProxy:
    def __init__(self, kubeconfig: str) -> None:
        api_client = config.new_client_from_config(config_file=kubeconfig)
        self._configuration = api_client.configuration
        self._upstream = self._configuration.host.rstrip("/")
        self.counts: Counter[str] = Counter()
        self.times: list[tuple[float, str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0
        self.trace: list[str] | None = [] if os.environ.get("COSTWARDEN_PROXY_TRACE") else None
        self._session: aiohttp.ClientSession | None = None

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: proxy, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            "users: [{name: anonymous, user: {}}]\n"
            "contexts: [{name: proxy, context: {cluster: proxy, user: anonymous}}]\n"
            "current-context: proxy\n"
        )
        return path

    def start(self) -> CountingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=_ssl_context(self._configuration), limit=200)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            # Pass bodies through as they are: the API server gzips large LISTs for clients
            # that accept it, and the Content-Encoding header goes through unchanged.
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _key(self, request: web.Request) -> str:
        watch = request.query.get("watch") in ("true", "1")
        parts = request.path.strip("/").split("/")
        resource = parts[-1] if len(parts) % 2 == 0 else parts[-2] if len(parts) > 1 else ""
        if parts and parts[-1] == "status":
            resource = f"{parts[-3]}/status"
        verb = "WATCH" if watch else request.method
        return f"{verb} {resource}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        if self.trace is not None:
            self.trace.append(f"{time.monotonic():.3f} {request.method} {request.path_qs}")
        self.counts[key] += 1
        self.times.append((time.monotonic(), key))
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        async with self._session.request(
            request.method,
            self._upstream + request.path_qs,
            headers=headers,
            data=body or None,
            # The official client sends some bodies without a Content-Type, which the API
            # server reads as JSON; aiohttp would add application/octet-stream (a 415).
            skip_auto_headers=["Content-Type"],
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS:
                    response.headers[name] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    def requests_between(self, start: float, end: float) -> Counter[str]:
        return Counter(key for moment, key in list(self.times) if start <= moment < end)

    def stop(self) -> None:
        async def close() -> None:
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def summary(counts: Counter[str], seconds: float) -> dict[str, Any]:
    per_minute = {k: round(v * 60 / seconds, 1) for k, v in counts.most_common()}
    return {"total_per_minute": round(sum(counts.values()) * 60 / seconds, 1), **per_minute}
