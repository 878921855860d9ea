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
  HTTP client API, kept for environments that need httpx's features (mounts, hooks).

All of them take the same :class:`~costwarden.gateway.egress.Egress`: the forward proxy
chosen per upstream (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``) and the TLS trust
(system CAs plus ``--upstream-ca-file``), so switching clients never changes where a
call goes or which certificates it accepts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Protocol

import aiohttp
import httpx

if TYPE_CHECKING:
    from costwarden.gateway.egress import Egress, Proxy

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

    def __init__(self, egress: Egress | None = None) -> None:
        from costwarden.gateway.egress import Egress

        self._egress = egress or Egress()
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, ttl_dns_cache=60, ssl=self._egress.ssl_context
                ),
                timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        proxy = self._egress.proxy_for_url(url)
        auth = None
        if proxy is not None and (proxy.username or proxy.password):
            auth = aiohttp.BasicAuth(proxy.username, proxy.password)
        try:
            response = await self._get_session().post(
                url, data=body, headers=dict(headers),
                proxy=proxy.url if proxy else None, proxy_auth=auth,
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamUnavailableError(f"{type(exc).__name__}: {exc}") from exc
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
    """httpx ``AsyncClient``; with ``aiohttp_transport`` it rides on aiohttp's transport.

    One client per proxy (and one for direct calls): the proxy is chosen per upstream by
    :class:`Egress`, never by httpx's own reading of the environment (``trust_env`` off).
    """

    def __init__(self, *, aiohttp_transport: bool = False, egress: Egress | None = None) -> None:
        from costwarden.gateway.egress import Egress

        self._aiohttp_transport = aiohttp_transport
        self._egress = egress or Egress()
        self._clients: dict[Proxy | None, httpx.AsyncClient] = {}

    def _get_client(self, proxy: Proxy | None) -> httpx.AsyncClient:
        client = self._clients.get(proxy)
        if client is None:
            via = None
            if proxy is not None:
                auth = (proxy.username, proxy.password) if proxy.authorization else None
                via = httpx.Proxy(proxy.url, auth=auth)
            context = self._egress.ssl_context
            transport: httpx.AsyncBaseTransport | None = None
            if self._aiohttp_transport:
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport(verify=context, trust_env=False, proxy=via)
                via = None
            timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
            client = self._clients[proxy] = httpx.AsyncClient(
                transport=transport, timeout=timeout, limits=limits, verify=context,
                proxy=via, trust_env=False,
            )  # fmt: skip
        return client

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        client = self._get_client(self._egress.proxy_for_url(url))
        request = client.build_request("POST", url, headers=headers, content=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


CLIENTS = ("http1", "aiohttp", "httpx-aiohttp", "httpx")


def make_upstream(kind: str, egress: Egress | None = None) -> UpstreamClient:
    """The client named ``kind``; ``egress`` defaults to no proxy and the system CAs."""
    if kind == "http1":
        from costwarden.gateway.http1 import Http1Upstream

        return Http1Upstream(egress)
    if kind == "aiohttp":
        return AiohttpUpstream(egress)
    if kind in ("httpx", "httpx-aiohttp"):
        return HttpxUpstream(aiohttp_transport=kind == "httpx-aiohttp", egress=egress)
    raise ValueError(f"unknown upstream client {kind!r}; choose one of {', '.join(CLIENTS)}")
