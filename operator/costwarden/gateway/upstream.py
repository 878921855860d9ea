"""The one seam between the gateway and the network: :class:`UpstreamClient`.

Routing, pricing, limits and loop detection never touch the network; the proxy hands a
prepared request to an ``UpstreamClient`` and reads an :class:`UpstreamResponse`. Tests
and benchmarks swap implementations:

- ``Http1Upstream`` (default, ``--upstream-client http1``, gateway/http1.py): a lean
  HTTP/1.1 client on llhttp; the only one that leaves room for the gateway's own work
  within the goal (< 0.5 ms added p50 at 1,000 rps). Numbers in benchmarks/README.md.
- :class:`AiohttpUpstream` (``--upstream-client aiohttp``): aiohttp's client. In a bare
  proxy at 1,000 rps: 0.71 / 1.72 ms p50/p99 versus 0.99 / 2.53 ms for httpx over the
  aiohttp transport, and httpx's default transport collapses (BENCHMARKS.md).
- :class:`HttpxUpstream` (``--upstream-client httpx`` or ``httpx-aiohttp``): the project's
  HTTP client API, kept for environments that need httpx's features (proxies, mounts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 600.0  # long generations stream for minutes; a stalled socket still ends


class UpstreamUnavailableError(Exception):
    """The upstream could not be reached or dropped the connection: try the next backend."""


class UpstreamResponse(Protocol):
    status: int

    @property
    def content_type(self) -> str: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        """Send a POST; raise :class:`UpstreamUnavailableError` if no response status arrives."""
        ...

    async def close(self) -> None: ...


class _AiohttpResponse:
    __slots__ = ("_response", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status

    @property
    def content_type(self) -> str:
        return self._response.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._response.close()


class AiohttpUpstream:
    """aiohttp's client with one pooled connector, created inside the running loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        try:
            response = await self._get_session().post(url, data=body, headers=dict(headers))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc
        return _AiohttpResponse(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _HttpxResponse:
    __slots__ = ("_response", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code

    @property
    def content_type(self) -> str:
        return self._response.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc
        finally:
            await self._response.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """httpx ``AsyncClient``; with ``aiohttp_transport`` it rides on aiohttp's transport."""

    def __init__(self, *, aiohttp_transport: bool = False) -> None:
        self._aiohttp_transport = aiohttp_transport
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            transport: httpx.AsyncBaseTransport | None = None
            if self._aiohttp_transport:
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport()
            timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
            self._client = httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits)
        return self._client

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        client = self._get_client()
        request = client.build_request("POST", url, headers=headers, content=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(type(exc).__name__) from exc
        return _HttpxResponse(response)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


CLIENTS = ("http1", "aiohttp", "httpx-aiohttp", "httpx")


def make_upstream(kind: str) -> UpstreamClient:
    if kind == "http1":
        from costwarden.gateway.http1 import Http1Upstream

        return Http1Upstream()
    if kind == "aiohttp":
        return AiohttpUpstream()
    if kind in ("httpx", "httpx-aiohttp"):
        return HttpxUpstream(aiohttp_transport=kind == "httpx-aiohttp")
    raise ValueError(f"unknown upstream client {kind!r}; choose one of {', '.join(CLIENTS)}")
