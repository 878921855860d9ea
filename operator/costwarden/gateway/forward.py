"""Sending a routed call upstream (with fallbacks) and relaying the answer, metered.

- Fallbacks: an unreachable backend, a 429 or a 5xx moves on to the next candidate; the
  last candidate's error is passed to the client as it came.
- A 2xx answer without valid usage (not JSON, no usage object) is never passed on as free
  usage: the client gets a 502 in the API's error shape and the record says
  ``UpstreamMalformed`` with ``usageReported: false``. In a stream the headers are already
  sent, so the client gets an error event (which both SDKs raise) instead.
- A client that disconnects mid-stream does not stop metering: the gateway keeps reading
  the upstream (at most :data:`DRAIN_SECONDS`) to get the usage it reports at the end, and
  records ``ClientDisconnected`` with that usage.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.usage import Outcome
from costwarden.gateway.call import Call
from costwarden.gateway.config import CompiledConfig
from costwarden.gateway.upstream import UpstreamResponse, UpstreamUnavailableError
from costwarden.gateway.wire import MalformedUsageError
from costwarden.policy.pricing import call_cost
from costwarden.policy.routing import RouteDecision

if TYPE_CHECKING:
    from costwarden.gateway.proxy import Gateway

DRAIN_SECONDS = 120.0
_RETRYABLE = frozenset({408, 429})


def _retryable(status: int) -> bool:
    return status in _RETRYABLE or status >= 500


async def forward(
    gw: Gateway,
    request: web.BaseRequest,
    call: Call,
    compiled: CompiledConfig,
    body: dict[str, Any],
    decision: RouteDecision,
    wants_usage: bool,
) -> web.StreamResponse:
    unreachable: list[str] = []
    answer = await _attempt(gw, request, call, compiled, body, decision, unreachable)
    if answer is None:
        call.outcome, call.error = Outcome.UPSTREAM_ERROR, "upstream_unavailable"
        # Why each backend failed (connection refused, TLS certificate rejected, proxy
        # refused...): the gateway's own words, no upstream bytes, so nothing to sanitise.
        tried = "; ".join(unreachable)
        return _error(call, 502, "upstream_unavailable", f"no backend answered ({tried})")
    response, route = answer
    if response.status >= 400:
        return await _pass_error(call, response)
    if call.streaming and response.content_type.startswith("text/event-stream"):
        return await _relay_stream(gw, request, call, response, route, wants_usage)
    return await _relay_plain(gw, call, response, route)


async def _attempt(
    gw: Gateway,
    request: web.BaseRequest,
    call: Call,
    compiled: CompiledConfig,
    body: dict[str, Any],
    decision: RouteDecision,
    unreachable: list[str],
) -> tuple[UpstreamResponse, ModelRoute] | None:
    candidates = decision.candidates
    for index, route in enumerate(candidates):
        call.served = route
        call.attempts += 1
        body["model"] = route.upstream_model
        headers = call.fmt.upstream_headers(
            gw.credentials.api_key(route.credentials), request.headers
        )
        url = compiled.url(call.policy_id, route, call.endpoint)
        started = time.perf_counter()
        try:
            response = await gw.upstream.post(url, headers, orjson.dumps(body))
        except UpstreamUnavailableError as exc:
            call.upstream_seconds += time.perf_counter() - started
            _count_error(gw, route, "unreachable")
            unreachable.append(f"{route.name}: {exc}")
            continue
        call.upstream_seconds += time.perf_counter() - started
        last = index == len(candidates) - 1
        if _retryable(response.status):
            _count_error(gw, route, str(response.status))
            if not last:
                await response.aclose()
                continue
        if index:
            call.reason += f"; fallback after {index} failed attempt(s)"
        return response, route
    return None


def _count_error(gw: Gateway, route: ModelRoute, kind: str) -> None:
    gw.metrics.upstream_errors.labels(route.name, route.provider.value, kind).inc()


def route_headers(call: Call, content_type: str) -> dict[str, str]:
    served = call.served
    return {
        "Content-Type": content_type,
        "x-costwarden-model": served.name if served else "",
        "x-costwarden-rule": call.rule,
        "x-costwarden-reason": call.reason,
        "x-costwarden-config-revision": call.revision,
        "x-costwarden-request-id": call.id,
    }


def _error(call: Call, status: int, code: str, message: str) -> web.Response:
    call.status = status
    headers = route_headers(call, "application/json")
    return web.Response(
        status=status, body=call.fmt.error_body(status, code, message), headers=headers
    )


async def _pass_error(call: Call, response: UpstreamResponse) -> web.Response:
    """The upstream's own error, as it sent it (it is already in the API's error shape)."""
    started = time.perf_counter()
    try:
        data = await response.read()
    except UpstreamUnavailableError:
        data = b""
    call.upstream_seconds += time.perf_counter() - started
    call.outcome, call.error, call.status = (
        Outcome.UPSTREAM_ERROR,
        f"upstream_{response.status}",
        response.status,
    )
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        message = f"the upstream answered HTTP {response.status} without a JSON error body"
        return _error(call, 502, "upstream_error", message)
    headers = route_headers(call, "application/json")
    return web.Response(status=response.status, body=data, headers=headers)


def _malformed(gw: Gateway, call: Call, route: ModelRoute, problem: str) -> str:
    call.outcome, call.error = Outcome.UPSTREAM_MALFORMED, "upstream_malformed"
    _count_error(gw, route, "malformed")
    return (
        f"the upstream behind model {route.name} answered without valid usage ({problem}); "
        "costwarden does not pass on an answer it cannot meter"
    )


async def _relay_plain(
    gw: Gateway, call: Call, response: UpstreamResponse, route: ModelRoute
) -> web.Response:
    started = time.perf_counter()
    try:
        data = await response.read()
    except UpstreamUnavailableError as exc:
        call.upstream_seconds += time.perf_counter() - started
        return _error(call, 502, "upstream_malformed", _malformed(gw, call, route, str(exc)))
    call.upstream_seconds += time.perf_counter() - started
    try:
        answer = orjson.loads(data)
        if not isinstance(answer, dict):
            raise MalformedUsageError("the answer is not a JSON object")
        tokens = call.fmt.usage(answer, call.endpoint)
    except (orjson.JSONDecodeError, MalformedUsageError) as exc:
        problem = "not JSON" if isinstance(exc, orjson.JSONDecodeError) else str(exc)
        return _error(call, 502, "upstream_malformed", _malformed(gw, call, route, problem))
    call.tokens, call.cost = tokens, call_cost(tokens, route.pricing)
    call.outcome, call.status = Outcome.OK, response.status
    headers = route_headers(call, response.content_type)
    return web.Response(status=response.status, body=data, headers=headers)


async def _relay_stream(
    gw: Gateway,
    request: web.BaseRequest,
    call: Call,
    response: UpstreamResponse,
    route: ModelRoute,
    wants_usage: bool,
) -> web.StreamResponse:
    meter = call.fmt.stream_meter(wants_usage)
    out = web.StreamResponse(
        status=response.status, headers=route_headers(call, "text/event-stream")
    )
    call.status = response.status
    await out.prepare(request)
    gone_at = 0.0
    chunks = response.chunks().__aiter__()
    while True:
        started = time.perf_counter()
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except UpstreamUnavailableError:
            meter.error = meter.error or "the upstream dropped the stream"
            break
        finally:
            call.upstream_seconds += time.perf_counter() - started
        data = meter.feed(chunk)
        if gone_at:
            if time.perf_counter() - gone_at > DRAIN_SECONDS:
                break
        elif data:
            gone_at = await _write(out, data)
    await response.aclose()
    return await _finish_stream(gw, call, out, meter, route, gone_at)


async def _write(out: web.StreamResponse, data: bytes) -> float:
    """Send ``data``; the time the client was found gone, or 0.0."""
    try:
        await out.write(data)
    except ConnectionError:
        return time.perf_counter()
    return 0.0


async def _finish_stream(
    gw: Gateway, call: Call, out: web.StreamResponse, meter: Any, route: ModelRoute, gone_at: float
) -> web.StreamResponse:
    rest = meter.end()
    if meter.usage is not None:
        call.tokens, call.cost = meter.usage, call_cost(meter.usage, route.pricing)
        call.outcome = Outcome.CLIENT_DISCONNECTED if gone_at else Outcome.OK
    elif gone_at:  # the client left and the usage never came: unknown, and said so
        call.outcome, call.error = Outcome.CLIENT_DISCONNECTED, "usage_unknown"
    else:
        message = _malformed(gw, call, route, meter.error)
        rest += call.fmt.stream_error_event("upstream_malformed", message)
    if not gone_at:
        if rest:
            gone_at = await _write(out, rest)
        if not gone_at:
            try:
                await out.write_eof()
            except ConnectionError:
                gone_at = time.perf_counter()
    if gone_at and call.outcome is Outcome.OK:
        call.outcome = Outcome.CLIENT_DISCONNECTED
    return out
