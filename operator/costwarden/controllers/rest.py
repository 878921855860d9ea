"""A lean asynchronous Kubernetes REST client (aiohttp + orjson) for the hot paths.

Why not the official client: it is synchronous (a worker thread per call) and turns every
object into typed Python models, which costs milliseconds per Job. Accounting and
enforcement only need a few verbs on raw JSON (GET, LIST by label selector, merge PATCH,
DELETE, POST, WATCH), so they speak HTTP directly, with the credentials of the official
client's configuration (kubeconfig or in-cluster service account).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from kubernetes import client

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]!r}")
        self.status = status


def _ssl_context(configuration: client.Configuration) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


class Rest:
    def __init__(self, configuration: client.Configuration, *, connections: int = 32) -> None:
        self._configuration = configuration
        self._host = configuration.host.rstrip("/")
        self._ssl = _ssl_context(configuration)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_api_client(cls, api_client: client.ApiClient) -> Rest:
        return cls(api_client.configuration)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        configuration = self._configuration
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)  # in-cluster token rotation
        # In-cluster configuration stores the token as "BearerToken" (kubernetes>=31), a
        # kubeconfig token as "authorization": the client's own auth_settings reads both.
        token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        data = orjson.dumps(body) if body is not None else None
        async with self._client().request(
            method,
            self._host + path,
            params=params,
            data=data,
            headers=self._headers(content_type if data is not None else None),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            raw = await response.read()
            if response.status >= 400:
                raise ApiError(response.status, method, path, raw)
            parsed: dict[str, Any] = orjson.loads(raw) if raw else {}
            return parsed

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def merge_patch(self, path: str, body: Any) -> dict[str, Any]:
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def post(self, path: str, body: Any) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def delete(self, path: str, body: Any = None) -> dict[str, Any]:
        return await self.request("DELETE", path, body=body)

    async def watch(
        self, path: str, params: Mapping[str, str], *, timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``), one JSON document per line."""
        query = {**params, "watch": "true", "timeoutSeconds": str(int(timeout))}
        async with self._client().get(
            self._host + path,
            params=query,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout + 30),
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, "WATCH", path, await response.read())
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            await asyncio.sleep(0)  # let the connector close its transports


def jobs_path(namespace: str | None = None, name: str | None = None) -> str:
    if namespace is None:
        return "/apis/batch/v1/jobs"
    base = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{base}/{name}" if name else base


def budget_path(namespace: str, name: str, *, status: bool = False) -> str:
    path = f"/apis/costwarden.io/v1alpha1/namespaces/{namespace}/teambudgets/{name}"
    return path + "/status" if status else path
