"""The aiohttp application: API routes, ``/v1/models``, health, metrics, background tasks.

aiohttp's server because it is the fastest pure-asyncio HTTP/1.1 server that also
streams (SSE) simply, and it is already here with kopf; with uvloop it carries 1,000 rps
on one core of this machine (BENCHMARKS.md, benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web

from costwarden.api.usage import Endpoint
from costwarden.gateway.anthropic import ANTHROPIC
from costwarden.gateway.call import Call
from costwarden.gateway.identity import UnattributedError, resolve_team
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.proxy import Gateway

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def build_app(gateway: Gateway, *, watch_config: bool = True) -> web.Application:
    # The default 1 MiB body cap is too small for long agent conversations.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[GATEWAY_KEY] = gateway

    async def chat(request: web.Request) -> web.StreamResponse:
        return await gateway.handle(request, OPENAI, Endpoint.CHAT_COMPLETIONS)

    async def embeddings(request: web.Request) -> web.StreamResponse:
        return await gateway.handle(request, OPENAI, Endpoint.EMBEDDINGS)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await gateway.handle(request, ANTHROPIC, Endpoint.MESSAGES)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)

    async def list_models(request: web.Request) -> web.Response:
        return await models(gateway, request)

    async def ready(request: web.Request) -> web.Response:
        return await readyz(gateway)

    async def prometheus(request: web.Request) -> web.Response:
        return await metrics(gateway)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/metrics", prometheus)
    app.cleanup_ctx.append(_lifecycle(gateway, watch_config))
    return app


def _lifecycle(
    gateway: Gateway, watch_config: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        tasks = []
        if watch_config:
            tasks.append(asyncio.create_task(_watch(gateway)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.upstream.close()
        await gateway.sink.close()

    return context


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


async def models(gateway: Gateway, request: web.Request) -> web.Response:
    """The models the caller's RoutingPolicy declares, in OpenAI's list shape."""
    call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
    compiled = gateway.config.current
    if compiled is None:
        return gateway.refuse(call, 503, "not_ready", "the gateway has no configuration yet")
    try:
        caller = await gateway.identifier.identify(request.headers)
    except UnattributedError as exc:
        return gateway.refuse(call, 401, "unattributed_caller", str(exc))
    team = resolve_team(caller, compiled)
    policy = compiled.policies.get(team.routing_policy or "") if team else None
    names = sorted(policy.models) if policy else []
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "costwarden"} for n in names]
    body = orjson.dumps({"object": "list", "data": data})
    return web.Response(body=body, content_type="application/json")


async def readyz(gateway: Gateway) -> web.Response:
    if gateway.config.current is None:
        return web.Response(status=503, text="no gateway configuration loaded")
    return web.Response(text=f"ok {gateway.config.current.revision}")


async def metrics(gateway: Gateway) -> web.Response:
    return web.Response(
        body=gateway.metrics.exposition(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
