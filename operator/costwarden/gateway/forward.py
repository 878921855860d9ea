"""Sending a routed call upstream (with fallbacks) and relaying the answer, metered.

- Fallbacks: an unreachable backend, a 429 or a 5xx moves on to the next candidate; the
  last candidate's error is passed to the client in the provider's error shape, rebuilt
  and scrubbed of key material (gateway/sanitize.py); a body without that shape is
  withheld. A candidate whose host the admin's provider hosts do not allow is never
  tried; with none left the call is refused (403, ``provider_host_not_allowed``).
- A 2xx answer without valid usage (not JSON, no usage object) is never passed on as free
  usage: the client gets a 502 in the API's error shape and the record says
  ``UpstreamMalformed`` with ``usageReported: false``. In a stream the headers are already
  sent, so the client gets an error event (which both SDKs raise) instead.
- A model whose ``credentials`` resolve to no key is never called (an upstream would
  answer 401, or, worse, an unauthenticated endpoint would serve it): the attempt is
  skipped like an unreachable backend, counted in
  ``costwarden_gateway_missing_credentials_total{model}``, and if no candidate is left the
  call is refused with **503** ``missing_credentials`` naming the Secret reference (a
  gateway misconfiguration the caller cannot fix: not a 401, and ``x-should-retry: false``).
- A stream whose usage never comes or cannot be used (ends early, drops, events that are
  not JSON objects, negative or absurd counts: see :data:`wire.MAX_TOKENS_PER_CALL`) was
  still sent to the client, and the provider bills it: it is charged an estimate
  (:func:`charge_unmetered_stream`), recorded ``UpstreamMalformed`` (or
  ``ClientDisconnected``) with reason ``usage_estimated``, counted in
  ``costwarden_gateway_estimated_usage_total``, and the client still gets the error event.
- A client that disconnects mid-stream does not stop metering: the gateway keeps reading
  the upstream (at most :data:`DRAIN_SECONDS`) to get the usage it reports at the end, and
  records ``ClientDisconnected`` with that usage.
- A stream that ends without usage (cut off, or the usage never came) is charged its
  reservation (``call.unmetered``; gateway/proxy.py settles it), never $0, unless the
  provider ended it with its own failure event, which it does not bill.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.usage import Endpoint, Outcome, RefusalReason
from costwarden.gateway.call import Call
from costwarden.gateway.config import CompiledConfig
from costwarden.gateway.sanitize import generic_message, sanitize_error, sanitize_stream_events
from costwarden.gateway.upstream import UpstreamResponse, UpstreamUnavailableError
from costwarden.gateway.wire import (
    MAX_TOKENS_PER_CALL,
    MalformedUsageError,
    estimate_prompt_tokens,
    tokens,
)
from costwarden.policy.pricing import call_cost
from costwarden.policy.routing import RouteDecision

if TYPE_CHECKING:
    from costwarden.gateway.proxy import Gateway

DRAIN_SECONDS = 120.0
MAX_ANSWER_BYTES = 128 * 2**20
"""The largest non-streamed answer the gateway reads (128 MiB: a 2,048-input embeddings
batch of 3,072 dimensions as JSON floats is ~125 MB); a larger one is refused 502
``upstream_malformed`` and not billed (the client never gets it)."""
MAX_ERROR_BYTES = 2**20
"""The most of an upstream error body read (1 MiB); the rest is not needed to rebuild it."""


class AnswerTooLargeError(Exception):
    pass


async def read_bounded(response: UpstreamResponse, limit: int) -> bytes:
    """The whole body, or AnswerTooLargeError past ``limit`` bytes (the upstream connection
    is closed then)."""
    parts: list[bytes] = []
    size = 0
    async for part in response.chunks():
        size += len(part)
        if size > limit:
            await response.aclose()
            raise AnswerTooLargeError(f"the answer is over {limit // 2**20} MiB")
        parts.append(part)
    return b"".join(parts)


_RETRYABLE = frozenset({408, 429})


def charge_unmetered_stream(gw: Gateway, call: Call, route: ModelRoute, streamed: int) -> str:
    """Charge a stream that reached the client without usable usage (the provider bills
    it); returns how, for the caller's error message.

    The one place this policy lives. A reserved call (gateway/reservations.py) is charged
    its reservation when it settles (``call.unmetered``; gateway/proxy.py): the worst case
    it was admitted with, never $0. Without a reservation (``--no-reservation``), the charge
    is an estimate: input at :data:`wire.BYTES_PER_TOKEN` bytes a token of the request body
    as sent upstream, output one token per ``data:`` event streamed (``streamed``; the
    providers stream about one token per content event, and counting events costs one
    C-level scan per chunk where reading the text out of each event cost ~2.5 us), each at
    most :data:`wire.MAX_TOKENS_PER_CALL`, priced like reported usage.
    """
    call.unmetered = True
    gw.metrics.estimated_usage.labels(route.name, route.provider.value).inc()
    if call.reservation is not None:
        return "this call is charged its reservation"
    estimate = tokens(
        min(estimate_prompt_tokens(call.prompt_bytes), MAX_TOKENS_PER_CALL),
        min(streamed, MAX_TOKENS_PER_CALL),
    )
    call.tokens = estimate
    call.cost = call_cost(estimate, route.pricing, call.tool_calls)
    call.error = "usage_estimated"
    return "this call is charged an estimate of its usage"


def charged_without_usage(reason: str) -> bool:
    """Whether a record's reason says it was charged without reported usage (its
    reservation, or an estimate where nothing was reserved)."""
    return reason == "usage_estimated" or reason.endswith("charged_reservation")


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
    allowed = [r for r in decision.candidates if compiled.host_allowed(call.policy_id, r)]
    if not allowed:
        for route in decision.candidates:
            _count_error(gw, route, "host_not_allowed")
        names = ", ".join(m.name for m in decision.candidates)
        return gw.refuse(
            call,
            403,
            RefusalReason.PROVIDER_HOST_NOT_ALLOWED,
            f"the endpoint of {names} is not one of the provider hosts the cluster admin "
            "allows; costwarden does not connect to it",
        )
    missing: list[str] = []
    unreachable: list[str] = []
    answer = await _attempt(
        gw, request, call, compiled, body, decision, allowed, missing, unreachable
    )
    if answer is None:
        if len(missing) == len(allowed):
            call.served = None
            return gw.refuse(call, 503, RefusalReason.MISSING_CREDENTIALS, " ".join(missing))
        call.outcome, call.error = Outcome.UPSTREAM_ERROR, "upstream_unavailable"
        # Why each backend failed (connection refused, TLS certificate rejected, proxy
        # refused, no key...): the gateway's own words, no upstream bytes, so nothing to
        # sanitise.
        tried = "; ".join(unreachable)
        message = f"no backend answered ({tried})" if tried else "no backend answered"
        if "previous_response_id" in call.reason:
            message += (
                "; not retried on another backend: the call continues a stored response "
                "(previous_response_id) that only this backend holds"
            )
        return _error(call, 502, "upstream_unavailable", " ".join([message, *missing]))
    response, route = answer
    secrets = _secrets(gw, route)
    if response.status >= 400:
        return await _pass_error(call, response, secrets)
    if call.streaming and response.content_type.startswith("text/event-stream"):
        return await _relay_stream(gw, request, call, response, route, wants_usage, secrets)
    return await _relay_plain(gw, call, response, route)


async def forward_count(
    gw: Gateway,
    request: web.BaseRequest,
    call: Call,
    compiled: CompiledConfig,
    body: dict[str, Any],
    decision: RouteDecision,
) -> web.StreamResponse:
    """A token count (no usage to meter): the routed model's answer, passed on as is;
    its errors sanitised like any other."""
    allowed = [r for r in decision.candidates if compiled.host_allowed(call.policy_id, r)]
    if not allowed:
        return gw.refuse(
            call,
            403,
            RefusalReason.PROVIDER_HOST_NOT_ALLOWED,
            "the routed model's endpoint is not one of the provider hosts the cluster admin "
            "allows; costwarden does not connect to it",
        )
    missing: list[str] = []
    unreachable: list[str] = []
    answer = await _attempt(
        gw, request, call, compiled, body, decision, allowed, missing, unreachable
    )
    if answer is None:
        if len(missing) == len(allowed):
            call.served = None
            return gw.refuse(call, 503, RefusalReason.MISSING_CREDENTIALS, " ".join(missing))
        call.outcome, call.error = Outcome.UPSTREAM_ERROR, "upstream_unavailable"
        return _error(call, 502, "upstream_unavailable", "no backend answered the token count")
    response, route = answer
    if response.status >= 400:
        return await _pass_error(call, response, _secrets(gw, route))
    started = time.perf_counter()
    try:
        data = await response.read()
    except UpstreamUnavailableError:
        call.upstream_seconds += time.perf_counter() - started
        call.outcome, call.error = Outcome.UPSTREAM_ERROR, "upstream_unavailable"
        return _error(call, 502, "upstream_unavailable", "the backend dropped the token count")
    call.upstream_seconds += time.perf_counter() - started
    call.outcome, call.status = Outcome.OK, response.status
    headers = route_headers(call, response.content_type)
    return web.Response(status=response.status, body=data, headers=headers)


async def _attempt(
    gw: Gateway,
    request: web.BaseRequest,
    call: Call,
    compiled: CompiledConfig,
    body: dict[str, Any],
    decision: RouteDecision,
    candidates: list[ModelRoute],
    missing: list[str],
    unreachable: list[str],
) -> tuple[UpstreamResponse, ModelRoute] | None:
    """The first answer worth relaying, trying the candidates the admin's provider hosts
    allow in order; ``missing`` collects why keyless candidates were skipped (never sent:
    see the module docstring)."""
    for route in decision.candidates:
        if route not in candidates:
            _count_error(gw, route, "host_not_allowed")
    for index, route in enumerate(candidates):
        api_key = gw.credentials.api_key(route.credentials)
        if route.credentials is not None and not api_key:
            gw.metrics.missing_credentials.labels(route.name).inc()
            missing.append(gw.credentials.missing_message(route.name, route.credentials))
            continue
        call.served = route
        call.attempts += 1
        body["model"] = route.upstream_model
        payload = orjson.dumps(body)
        call.prompt_bytes = len(payload)
        headers = call.fmt.upstream_headers(api_key, request.headers)
        url = compiled.url(call.policy_id, route, call.endpoint)
        if request.query_string:  # ?beta=true and the like go on as the client sent them
            url += "?" + request.query_string
        started = time.perf_counter()
        try:
            response = await gw.upstream.post(url, headers, payload)
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


def _secrets(gw: Gateway, route: ModelRoute) -> tuple[str, ...]:
    key = gw.credentials.api_key(route.credentials)
    return (key,) if key else ()


async def _pass_error(
    call: Call, response: UpstreamResponse, secrets: tuple[str, ...]
) -> web.Response:
    """The upstream's own error, rebuilt from the provider's error shape with anything
    key-like removed (gateway/sanitize.py); any other body is withheld."""
    started = time.perf_counter()
    try:
        data = await read_bounded(response, MAX_ERROR_BYTES)
    except (UpstreamUnavailableError, AnswerTooLargeError):
        data = b""
    call.upstream_seconds += time.perf_counter() - started
    call.outcome, call.error, call.status = (
        Outcome.UPSTREAM_ERROR,
        f"upstream_{response.status}",
        response.status,
    )
    clean = sanitize_error(call.fmt.provider, response.status, data, secrets)
    if clean is None:
        return _error(call, 502, "upstream_error", generic_message(response.status))
    headers = route_headers(call, "application/json")
    return web.Response(status=response.status, body=clean, headers=headers)


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
        data = await read_bounded(response, MAX_ANSWER_BYTES)
    except (UpstreamUnavailableError, AnswerTooLargeError) as exc:
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
    call.tool_calls = call.fmt.tool_calls(answer)
    call.service_tier = call.fmt.service_tier(answer)
    call.response_id = str(answer.get("id") or "") if call.endpoint is Endpoint.RESPONSES else ""
    call.tokens = tokens
    call.cost = call_cost(tokens, route.pricing, call.tool_calls, call.service_tier)
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
    secrets: tuple[str, ...],
) -> web.StreamResponse:
    meter = call.fmt.stream_meter(wants_usage)
    provider = call.fmt.provider
    out = web.StreamResponse(
        status=response.status, headers=route_headers(call, "text/event-stream")
    )
    call.status = response.status
    gone_at = 0.0
    try:
        await out.prepare(request)
    except ConnectionError:
        # The client gave up before the first byte (its timeout, under a slow upstream):
        # the stream is still read for the usage the provider bills (DRAIN_SECONDS).
        gone_at = time.perf_counter()
    streamed = 0
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
        streamed += chunk.count(b"data:")  # events: the output estimate if usage never comes
        data = sanitize_stream_events(provider, meter.feed(chunk), secrets)
        if gone_at:
            if time.perf_counter() - gone_at > DRAIN_SECONDS:
                break
        elif data:
            gone_at = await _write(out, data)
    await response.aclose()
    return await _finish_stream(gw, call, out, meter, route, gone_at, secrets, streamed)


async def _write(out: web.StreamResponse, data: bytes) -> float:
    """Send ``data``; the time the client was found gone, or 0.0."""
    try:
        await out.write(data)
    except ConnectionError:
        return time.perf_counter()
    return 0.0


async def _finish_stream(
    gw: Gateway,
    call: Call,
    out: web.StreamResponse,
    meter: Any,
    route: ModelRoute,
    gone_at: float,
    secrets: tuple[str, ...],
    streamed: int,
) -> web.StreamResponse:
    rest = sanitize_stream_events(call.fmt.provider, meter.end(), secrets)
    call.tool_calls = getattr(meter, "tool_calls", {})
    call.response_id = getattr(meter, "response_id", "")
    if meter.usage is not None:
        call.tokens = meter.usage
        call.service_tier = meter.service_tier
        call.cost = call_cost(meter.usage, route.pricing, call.tool_calls, call.service_tier)
        call.outcome = Outcome.CLIENT_DISCONNECTED if gone_at else Outcome.OK
    elif getattr(meter, "failed", False):
        # The provider ended the stream with its own failure event (Responses API
        # response.failed / error), which the client already has: an upstream error,
        # no usage reported, nothing appended.
        call.outcome, call.error = Outcome.UPSTREAM_ERROR, "upstream_failed"
        if gone_at:
            call.outcome = Outcome.CLIENT_DISCONNECTED
    elif gone_at:  # the client left and the usage never came: billed by the provider anyway
        call.outcome = Outcome.CLIENT_DISCONNECTED
        charge_unmetered_stream(gw, call, route, streamed)
    else:
        call.unmetered = True  # an answer was generated but its usage never came
        message = _malformed(gw, call, route, meter.error)
        message += "; " + charge_unmetered_stream(gw, call, route, streamed)
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
