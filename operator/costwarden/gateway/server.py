"""The HTTP server: API routes, ``/v1/models``, health, background tasks; and ``/metrics``
on a port of its own (``--metrics-port``), never on the API port callers reach.

aiohttp's server because it is the fastest pure-asyncio HTTP/1.1 server that also
streams (SSE) simply, and it is already here with kopf; with uvloop it carries 1,000 rps
on one core of this machine (BENCHMARKS.md, benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from costwarden.api.usage import Endpoint
from costwarden.gateway.anthropic import ANTHROPIC
from costwarden.gateway.call import Call
from costwarden.gateway.identity import IdentityUnavailableError, UnattributedError, resolve_team
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.proxy import Gateway
from costwarden.gateway.responses import RESPONSES
from costwarden.gateway.wire import WireFormat

MAX_BODY = 64 * 1024 * 1024  # aiohttp's 1 MiB default is too small for long agent conversations

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class GatewayServer:
    """The gateway on aiohttp's low-level server: one dict lookup routes a request.

    ``web.Application`` adds a router, a middleware chain and signals per request; the
    gateway has nine fixed routes, and the low-level server saves ~50-90 us of CPU per
    call on this machine. Build it inside the running loop (aiohttp's server needs one).
    """

    def __init__(self, gateway: Gateway, *, watch_config: bool = True) -> None:
        self.gateway = gateway
        self._watch_config = watch_config
        self._tasks: list[asyncio.Task[None]] = []
        self._loop = asyncio.get_running_loop()
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self._api(OPENAI, Endpoint.CHAT_COMPLETIONS),
            ("POST", "/v1/embeddings"): self._api(OPENAI, Endpoint.EMBEDDINGS),
            ("POST", "/v1/messages"): self._api(ANTHROPIC, Endpoint.MESSAGES),
            ("POST", "/v1/responses"): self._api(RESPONSES, Endpoint.RESPONSES),
            ("POST", "/v1/messages/count_tokens"): lambda request: gateway.count_tokens(
                request, ANTHROPIC
            ),
            ("GET", "/v1/models"): lambda request: models(gateway, request),
            ("GET", "/healthz"): lambda request: healthz(gateway),
            ("GET", "/readyz"): lambda request: readyz(gateway),
        }
        # No access log: the decision log already has one line per call.
        # lingering_time=0: a call refused before its body was read (unauthenticated,
        # unattributed) gets its answer and the connection is closed; the body is never
        # read, not even to discard it (aiohttp would otherwise drain it for up to 10 s).
        self.server = web.Server(
            self._dispatch, request_factory=self._make_request, access_log=None,
            lingering_time=0,
        )  # fmt: skip

    def _api(self, fmt: WireFormat, endpoint: Endpoint) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await self.gateway.handle(request, fmt, endpoint)

        return handle

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            self.gateway.metrics.unknown_route(request.method, request.path)
            fmt = ANTHROPIC if _speaks_anthropic(request) else OPENAI
            body = fmt.error_body(404, "not_found", f"no route {request.method} {request.path}")
            return web.Response(status=404, body=body, content_type="application/json")
        return await handler(request)

    def _make_request(
        self,
        message: Any,
        payload: Any,
        protocol: Any,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, self._loop, client_max_size=MAX_BODY
        )

    async def start(self) -> None:
        # A sink with a start() (the operator reporting sink) re-sends what a previous run
        # left unacknowledged, without waiting for the first call.
        start_sink = getattr(self.gateway.sink, "start", None)
        if start_sink is not None:
            start_sink()
        leases = self.gateway.leases
        if leases is not None:
            self._tasks.append(self.gateway.supervisor.start("lease-renewal", leases.run))
        if self._watch_config:
            gateway = self.gateway
            self._tasks.append(gateway.supervisor.start("config-watch", lambda: _watch(gateway)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.gateway.upstream.close()
        await self.gateway.sink.close()


def _speaks_anthropic(request: web.BaseRequest) -> bool:
    """The Anthropic SDKs send ``anthropic-version`` (and ``x-api-key``) on every call."""
    headers = request.headers
    return "anthropic-version" in headers or (
        "x-api-key" in headers and "Authorization" not in headers
    )


def metrics_server(gateway: Gateway) -> web.Server:
    """``GET /metrics`` (and ``/healthz``) alone: what Prometheus scrapes, on its own port.
    Kept off the API port: the metrics name every team, model and rule, and a caller of the
    API (any pod in the cluster, for the shared gateway) has no business reading them."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/metrics":
            return await metrics(gateway)
        if request.method == "GET" and request.path == "/healthz":
            return await healthz(gateway)
        return web.Response(status=404, text=f"no route {request.method} {request.path}")

    return web.Server(handle, access_log=None)


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    metrics_host: str | None = None,
    metrics_port: int = 0,
) -> None:
    """Serve until ``stop`` is set, then finish in-flight calls and flush the sinks.
    ``metrics_port`` 0: no metrics listener."""
    app = GatewayServer(gateway)
    runner = web.ServerRunner(app.server, handle_signals=False)
    await runner.setup()
    await app.start()
    await web.TCPSite(runner, host, port).start()
    scrape: web.ServerRunner | None = None
    if metrics_port:
        scrape = web.ServerRunner(metrics_server(gateway), handle_signals=False)
        await scrape.setup()
        await web.TCPSite(scrape, metrics_host or host, metrics_port).start()
    try:
        await stop.wait()
    finally:
        if scrape is not None:
            await scrape.cleanup()
        await runner.cleanup()  # stops accepting, lets running calls finish
        await app.stop()


async def _watch(gateway: Gateway) -> None:
    """Poll the configuration file; count reloads and publish the revision in force."""
    store = gateway.config
    if store.current is not None:
        gateway.metrics.set_revision(store.current.revision)
    errors = store.errors
    while True:
        await asyncio.sleep(1.0)
        try:
            changed = store.poll()
        except OSError:
            continue
        if changed and store.current is not None:
            gateway.metrics.config_reloads.labels("ok").inc()
            gateway.metrics.set_revision(store.current.revision)
        if store.errors != errors:
            gateway.metrics.config_reloads.labels("error").inc(store.errors - errors)
            errors = store.errors


async def models(gateway: Gateway, request: web.BaseRequest) -> web.Response:
    """The models the caller's RoutingPolicy declares, in OpenAI's list shape."""
    call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
    compiled = gateway.config.current
    if compiled is None:
        return gateway.refuse(call, 503, "not_ready", "the gateway has no configuration yet")
    try:
        caller = await gateway.identifier.identify(request.headers)
    except UnattributedError as exc:
        return gateway.refuse(call, 401, "unattributed_caller", str(exc))
    except IdentityUnavailableError as exc:
        return gateway.refuse(call, exc.status, "identity_check_unavailable", str(exc))
    team = resolve_team(caller, compiled)
    policy = compiled.policies.get(team.routing_policy or "") if team else None
    names = sorted(policy.models) if policy else []
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "costwarden"} for n in names]
    body = orjson.dumps({"object": "list", "data": data})
    return web.Response(body=body, content_type="application/json")


async def healthz(gateway: Gateway) -> web.Response:
    """Liveness: 503 once a supervised background task has been failing for longer than
    its bound (costwarden/supervision.py, docs/operations.md), naming it."""
    problems = gateway.supervisor.problems()
    if problems:
        return web.Response(status=503, text="failing: " + "; ".join(problems))
    return web.Response(text="ok")


async def readyz(gateway: Gateway) -> web.Response:
    if gateway.config.current is None:
        return web.Response(status=503, text="no gateway configuration loaded")
    return web.Response(text=f"ok {gateway.config.current.revision}")


async def metrics(gateway: Gateway) -> web.Response:
    return web.Response(
        body=gateway.metrics.exposition(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
