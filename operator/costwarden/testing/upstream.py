"""A local upstream that speaks the OpenAI and Anthropic wire formats, for tests and demos.

Serves ``POST /v1/chat/completions`` (plain, ``stream`` with ``include_usage``, tool calls),
``POST /v1/embeddings``, ``GET /v1/models``, the Responses API ``POST /v1/responses`` (plain
and streamed, function and built-in tool calls, reasoning tokens, stored responses for
``previous_response_id``), Anthropic ``POST /v1/messages`` (plain and the streaming SSE
event sequence, server web search with ``usage.server_tool_use``) and
``POST /v1/messages/count_tokens``. Usage is realistic (OpenAI
``prompt_tokens_details.cached_tokens``; Anthropic ``cache_read_input_tokens`` and
``cache_creation_input_tokens``) and deterministic: :func:`prompt_tokens` of the request,
so a test can compute it. Every answer is logged in :attr:`FakeUpstream.calls` with the
usage exactly as reported.

Faults, for fallback and loop tests: a model id ``fault-<name>`` always fails that way, and
:meth:`FakeUpstream.script` (or ``POST /_fake/faults``) queues faults for a model. Fault
names: ``500``/``503``/``429`` (error status), ``malformed`` (200, not JSON), ``no-usage``
(200, no usage), ``slow`` (streams one chunk per 50 ms), ``verbose`` (chat: the answer
runs to its full ``max_tokens``, one output token a word); hostile upstreams, for the
error-body sanitiser: ``echo-key`` (401 in the provider's shape, the key it was sent in the
message), ``echo-key-fragment`` (the same with 12 characters of it), ``echo-key-text``
(401 text/plain with the key), ``html`` (502 with an internal HTML page) and
``stream-echo-key`` (a stream that ends in an error event carrying the key).

Hostile streams (chat completions and messages, ``stream: true``; :data:`HOSTILE_STREAMS`):
``no-usage`` (never reports usage), ``stream-array-events`` (every event's JSON wrapped in
an array), ``stream-truncated`` (cut in the middle of the usage event, no end),
``stream-negative-usage``, ``stream-huge-usage`` (10**30 prompt tokens),
``stream-not-json`` (the usage event is not JSON), ``stream-message-not-object``
(Anthropic ``message_start.message`` is an array; OpenAI ``usage`` is a string) and
``stream-string-usage`` (token counts as strings); the same on Responses API streams
(where ``stream-message-not-object`` makes the closing ``response`` an array);
``slow-no-usage`` is a chat stream without usage at one chunk per 50 ms; ``raw-stream``
answers the next bytes queued in :attr:`FakeUpstream.raw_streams`. The usage logged in
:attr:`FakeUpstream.calls` is what a real provider would have billed.

Network faults, for the fault suite (chat completions; :data:`NETWORK_FAULTS`):
``slow-answer`` (answers after :attr:`FakeUpstream.slow_answer_seconds`, beyond a client's
timeout: billed, as a provider bills what it generated), ``reset-before-answer`` (reads
the request, then resets the connection: nothing billed), ``reset-mid-answer`` (a plain
answer cut by a reset half-way through its body: not billed, the answer never arrived; a
stream cut by a reset after its usage event, before its end: billed) and ``garbage`` (bytes
that are not HTTP, then the connection closed: nothing billed). :attr:`FakeUpstream.mix`
draws a fault for every call that has none scripted (seeded, so a run can be repeated), for
load tests; :attr:`ServedCall.fault` says which one each call got.

Run it as a process: ``python -m costwarden.testing.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from costwarden.testing import answers
from costwarden.testing.answers import prompt_tokens
from costwarden.testing.threads import ServerThread

__all__ = [
    "NETWORK_FAULTS",
    "FakeUpstream",
    "ServedCall",
    "ServerThread",
    "main",
    "prompt_tokens",
    "serve",
]

FAULT_PREFIX = "fault-"
HOSTILE_STREAMS = (
    "no-usage",
    "stream-array-events",
    "stream-truncated",
    "stream-negative-usage",
    "stream-huge-usage",
    "stream-not-json",
    "stream-message-not-object",
    "stream-string-usage",
)
NETWORK_FAULTS = ("slow-answer", "reset-before-answer", "reset-mid-answer", "garbage")
GARBAGE = b'\x00\xff\xfeNOT-HTTP \x1b[31m\r\n\r\n{"usage": \x00}\r\n'


@dataclass
class ServedCall:
    """One answered request, as a test inspects it."""

    path: str
    model: str
    stream: bool
    usage: dict[str, Any] | None
    authorization: str
    api_key: str
    body: dict[str, Any]
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    fault: str = ""
    """The fault this call got ("" for a normal answer)."""


@dataclass
class FakeUpstream:
    """The fake provider; ``app()`` builds its aiohttp application."""

    calls: list[ServedCall] = field(default_factory=list)
    faults: dict[str, deque[str]] = field(default_factory=dict)
    chunk_delay: float = 0.0
    keep_calls: bool = True
    name: str = "fake"
    """Prefix of the response ids this upstream stores (``resp_<name>_<n>``)."""
    stored: set[str] = field(default_factory=set)
    """Responses API ids this upstream holds (what ``previous_response_id`` may name)."""
    raw_streams: deque[bytes] = field(default_factory=deque)
    """What the fault ``raw-stream`` answers, one entry a call, as an event stream (for
    fuzzing the gateway with arbitrary upstream bytes)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Fault name -> probability, drawn for each call with no scripted fault."""
    seed: int = 13
    slow_answer_seconds: float = 2.0
    """How long ``slow-answer`` waits before answering."""

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)  # noqa: S311 (a repeatable draw, no secret)

    async def _raw_stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self._log(request, body, None)
        response = await _sse_response(request)
        await response.write(self.raw_streams.popleft())
        return response

    latency: float = 0.0
    """Seconds every POST waits before it is answered (a slow provider, for tests that
    need many calls in flight at once)."""
    waiting: int = 0
    """POSTs received (body read) and still in their ``latency`` wait."""

    def script(self, model: str, *faults: str) -> None:
        """Queue faults for the next requests naming ``model`` (upstream id)."""
        self.faults.setdefault(model, deque()).extend(faults)

    def _fault(self, model: str) -> str:
        if model.startswith(FAULT_PREFIX):
            return model[len(FAULT_PREFIX) :]
        queue = self.faults.get(model)
        if queue:
            return queue.popleft()
        draw = self._random.random()
        for fault, probability in self.mix.items():
            if draw < probability:
                return fault
            draw -= probability
        return ""

    def _log(
        self,
        request: web.Request,
        body: dict[str, Any],
        usage: dict[str, Any] | None,
        fault: str = "",
    ) -> None:
        if self.keep_calls:
            self.calls.append(
                ServedCall(
                    path=request.path,
                    model=str(body.get("model", "")),
                    stream=bool(body.get("stream")),
                    usage=usage,
                    authorization=request.headers.get("Authorization", ""),
                    api_key=request.headers.get("x-api-key", ""),
                    body=body,
                    query=request.query_string,
                    headers=dict(request.headers),
                    fault=fault,
                )
            )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._slow])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/_fake/faults", self._set_faults)
        return app

    @web.middleware
    async def _slow(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.latency and request.method == "POST" and not request.path.startswith("/_fake"):
            # The request is received (and billed, once answered) before the model works on
            # it, as at a provider: a caller that goes away meanwhile is still billed.
            await request.read()
            self.waiting += 1
            try:
                await asyncio.sleep(self.latency)
            finally:
                self.waiting -= 1
        response: web.StreamResponse = await handler(request)
        return response

    async def _set_faults(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.script(data["model"], *data["faults"])
        return web.json_response({"queued": len(self.faults[data["model"]])})

    async def _models(self, request: web.Request) -> web.Response:
        names = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if fault == "raw-stream":
            return await self._raw_stream(request, body)
        if fault in NETWORK_FAULTS:
            return await self._network_fault(request, body, fault)
        if early := _early_fault(fault, openai=True, key=_sent_key(request)):
            self._log(request, body, None, fault)
            return early
        slow = fault == "slow-no-usage"  # one chunk per 50 ms, no usage: for disconnects
        fault = "no-usage" if slow else fault
        if body.get("stream") and fault in HOSTILE_STREAMS:
            billed = answers.openai_usage(body)
            self._log(request, body, billed)
            response = await _sse_response(request)
            for text in _hostile_chat(fault, body, billed):
                await self._send(response, text.decode(), slow)
            return response
        sent = body
        if fault == "verbose":  # the answer runs to its ceiling (max_tokens words)
            body = body | {answers.VERBOSE: True}
        usage: dict[str, Any] | None = None if fault == "no-usage" else answers.openai_usage(body)
        self._log(request, sent, usage)
        if body.get("stream") and fault == "stream-echo-key":
            return await _stream_echoing_key(request, body, openai=True)
        if body.get("stream"):
            return await self._chat_stream(request, body, usage, slow=fault == "slow")
        return web.json_response(answers.chat_completion(body, usage))

    async def _chat_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        usage: dict[str, Any] | None,
        slow: bool,
        *,
        reset_before_end: bool = False,
    ) -> web.StreamResponse:
        response = await _sse_response(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for chunk in answers.chat_chunks(body, include_usage):
            await self._send(response, f"data: {json.dumps(chunk)}\n\n", slow)
        if include_usage and usage is not None:
            final = answers.chunk_base(body) | {"choices": [], "usage": usage}
            await self._send(response, f"data: {json.dumps(final)}\n\n", slow)
        if reset_before_end:
            await asyncio.sleep(0.01)  # let the usage event leave before the reset
            _reset(request)
            return response
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _network_fault(
        self, request: web.Request, body: dict[str, Any], fault: str
    ) -> web.StreamResponse:
        """The :data:`NETWORK_FAULTS` on chat completions (see the module docstring for
        what each one bills)."""
        usage = answers.openai_usage(body)
        if fault == "slow-answer":
            await asyncio.sleep(self.slow_answer_seconds)
            self._log(request, body, usage, fault)
            if body.get("stream"):
                return await self._chat_stream(request, body, usage, slow=False)
            return web.json_response(answers.chat_completion(body, usage))
        if fault == "reset-mid-answer" and body.get("stream"):
            self._log(request, body, usage, fault)
            return await self._chat_stream(request, body, usage, False, reset_before_end=True)
        self._log(request, body, None, fault)
        assert request.transport is not None
        if fault == "reset-mid-answer":
            answer = json.dumps(answers.chat_completion(body, usage)).encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(answer)}\r\n\r\n"
            )
            request.transport.write(head.encode() + answer[: len(answer) // 2])
            await asyncio.sleep(0.01)  # let the first half leave before the reset
        elif fault == "garbage":
            request.transport.write(GARBAGE)
            await asyncio.sleep(0.01)
        _reset(request)
        # The connection is gone: aiohttp finds it closed and sends nothing of this.
        return web.Response(status=500)

    async def _send(self, response: web.StreamResponse, text: str, slow: bool) -> None:
        delay = 0.05 if slow else self.chunk_delay
        if delay:
            await asyncio.sleep(delay)
        await response.write(text.encode())

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if early := _early_fault(fault, openai=True, key=_sent_key(request)):
            self._log(request, body, None)
            return early
        inputs = body.get("input")
        items = (
            inputs
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], str)
            else [inputs]
        )
        tokens = sum(len(i) if isinstance(i, list) else answers.count_words(str(i)) for i in items)
        usage = None if fault == "no-usage" else {"prompt_tokens": tokens, "total_tokens": tokens}
        self._log(request, body, usage)
        data = [answers.embedding(i, body.get("encoding_format")) for i in range(len(items))]
        result: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if usage is not None:
            result["usage"] = usage
        return web.json_response(result)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if fault == "raw-stream":
            return await self._raw_stream(request, body)
        if early := _early_fault(fault, openai=False, key=_sent_key(request)):
            self._log(request, body, None)
            return early
        usage = answers.anthropic_usage(body)
        if body.get("stream") and fault in HOSTILE_STREAMS:
            self._log(request, body, usage)
            response = await _sse_response(request)
            for text in _hostile_messages(fault, body, usage):
                await response.write(text)
            return response
        self._log(request, body, None if fault == "no-usage" else usage)
        if body.get("stream") and fault == "stream-echo-key":
            return await _stream_echoing_key(request, body, openai=False)
        if body.get("stream"):
            return await self._messages_stream(
                request, body, usage, slow=fault == "slow", no_usage=fault == "no-usage"
            )
        message = answers.anthropic_message(body, usage)
        if fault == "no-usage":
            del message["usage"]
        return web.json_response(message)

    async def _messages_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        usage: dict[str, Any],
        *,
        slow: bool,
        no_usage: bool,
    ) -> web.StreamResponse:
        response = await _sse_response(request)
        for event in answers.anthropic_events(body, usage, no_usage=no_usage):
            text = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            await self._send(response, text, slow)
        return response

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic token counting: ``{"input_tokens": n}``, free, nothing billed."""
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if early := _early_fault(fault, openai=False, key=_sent_key(request)):
            self._log(request, body, None)
            return early
        self._log(request, body, None)
        return web.json_response({"input_tokens": prompt_tokens(body)})

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: a stored response per call; ``previous_response_id`` must name
        one this upstream stored (else 400, as OpenAI answers). Faults ``failed`` (the
        stream ends in response.failed without usage; plain: 500) and ``incomplete``
        (status incomplete, max_output_tokens) besides the common ones."""
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if fault == "raw-stream":
            return await self._raw_stream(request, body)
        if early := _early_fault(fault, openai=True, key=_sent_key(request)):
            self._log(request, body, None)
            return early
        previous = body.get("previous_response_id")
        if previous and previous not in self.stored:
            self._log(request, body, None)
            error = {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
            return web.json_response({"error": error}, status=400)
        if fault == "incomplete":
            body = body | {"max_output_tokens": body.get("max_output_tokens") or 3}
        usage = None if fault in ("no-usage", "failed") else answers.responses_usage(body)
        self._log(request, body, usage)
        response_id = f"resp_{self.name}_{len(self.stored) + 1}"
        self.stored.add(response_id)
        _, cut = answers.responses_words(body)
        status = "failed" if fault == "failed" else "incomplete" if cut else "completed"
        if body.get("stream") and fault in HOSTILE_STREAMS and fault != "no-usage":
            billed = answers.responses_usage(body)
            self._log(request, body, billed)
            response = await _sse_response(request)
            for hostile in _hostile_responses(fault, body, response_id, billed, status):
                await response.write(hostile)
            return response
        if body.get("stream"):
            response = await _sse_response(request)
            ending = f"response.{status}"
            for event in answers.responses_events(body, response_id, usage, ending):
                if fault == "no-usage" and event["type"] == ending:
                    break  # the stream stops before its closing event
                text = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                await self._send(response, text, fault == "slow")
            return response
        if fault == "failed":
            return web.json_response(_error_body("fake upstream failed", openai=True), status=500)
        return web.json_response(answers.response_object(body, response_id, usage, status))


def _hostile_chat(fault: str, body: dict[str, Any], usage: dict[str, Any]) -> list[bytes]:
    """A chat completion stream that misbehaves as ``fault`` says (HOSTILE_STREAMS)."""
    events: list[Any] = list(answers.chat_chunks(body, True))
    final: dict[str, Any] = answers.chunk_base(body) | {"choices": [], "usage": dict(usage)}
    if fault == "stream-negative-usage":
        final["usage"]["prompt_tokens"] = -usage["prompt_tokens"] - 1
    elif fault == "stream-huge-usage":
        final["usage"]["prompt_tokens"] = 10**30
    elif fault == "stream-string-usage":
        final["usage"] = {k: str(v) for k, v in usage.items()}
    elif fault == "stream-message-not-object":
        final["usage"] = json.dumps(usage)
    if fault != "no-usage":
        events.append(final)
    if fault == "stream-array-events":
        events = [[e] for e in events]
    texts = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
    if fault == "stream-not-json":
        texts[-1] = b'data: {"usage": {"prompt_tokens": 12, oops\n\n'
    if fault == "stream-truncated":
        return [*texts[:-1], texts[-1][: len(texts[-1]) // 2]]
    return [*texts, b"data: [DONE]\n\n"]


def _hostile_messages(fault: str, body: dict[str, Any], usage: dict[str, Any]) -> list[bytes]:
    """An Anthropic message stream that misbehaves as ``fault`` says (HOSTILE_STREAMS)."""
    events: list[Any] = json.loads(
        json.dumps(answers.anthropic_events(body, usage, no_usage=fault == "no-usage"))
    )
    start = next(e for e in events if e["type"] == "message_start")
    delta = next(e for e in events if e["type"] == "message_delta")
    if fault == "stream-negative-usage":
        start["message"]["usage"]["input_tokens"] = -usage["input_tokens"] - 1
    elif fault == "stream-huge-usage":
        start["message"]["usage"]["input_tokens"] = 10**30
    elif fault == "stream-string-usage":
        delta["usage"] = {k: str(v) for k, v in delta["usage"].items()}
    elif fault == "stream-message-not-object":
        start["message"] = [start["message"]]
    names = [e["type"] for e in events]
    if fault == "stream-array-events":
        events = [[e] for e in events]
    texts = [
        f"event: {name}\ndata: {json.dumps(e)}\n\n".encode()
        for name, e in zip(names, events, strict=True)
    ]
    if fault == "stream-not-json":
        at = names.index("message_delta")
        texts[at] = b'event: message_delta\ndata: {"type": "message_delta", "usage": {oops\n\n'
    if fault == "stream-truncated":
        at = names.index("message_delta")
        return [*texts[:at], texts[at][: len(texts[at]) // 2]]
    return texts


def _hostile_responses(
    fault: str, body: dict[str, Any], response_id: str, usage: dict[str, Any], status: str
) -> list[bytes]:
    """A Responses API stream that misbehaves as ``fault`` says (HOSTILE_STREAMS; the
    Responses ``stream-message-not-object`` makes the closing event's ``response`` an
    array)."""
    ending = f"response.{status}"
    events: list[Any] = json.loads(
        json.dumps(answers.responses_events(body, response_id, usage, ending))
    )
    final = events[-1]
    if fault == "stream-negative-usage":
        final["response"]["usage"]["input_tokens"] = -usage["input_tokens"] - 1
    elif fault == "stream-huge-usage":
        final["response"]["usage"]["input_tokens"] = 10**30
    elif fault == "stream-string-usage":
        final["response"]["usage"] = {
            k: str(v) if isinstance(v, int) else v for k, v in usage.items()
        }
    elif fault == "stream-message-not-object":
        final["response"] = [final["response"]]
    names = [e["type"] for e in events]
    if fault == "stream-array-events":
        events = [[e] for e in events]
    texts = [
        f"event: {name}\ndata: {json.dumps(e)}\n\n".encode()
        for name, e in zip(names, events, strict=True)
    ]
    if fault == "stream-not-json":
        texts[-1] = f'event: {ending}\ndata: {{"type": "{ending}", oops\n\n'.encode()
    if fault == "stream-truncated":
        texts[-1] = texts[-1][: len(texts[-1]) // 2]
    return texts


def _sent_key(request: web.Request) -> str:
    bearer = request.headers.get("Authorization", "")
    return request.headers.get("x-api-key") or bearer.removeprefix("Bearer ").strip()


def _error_body(message: str, *, openai: bool, kind: str = "api_error") -> dict[str, Any]:
    if openai:
        return {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return {"type": "error", "error": {"type": kind, "message": message}}


async def _stream_echoing_key(
    request: web.Request, body: dict[str, Any], *, openai: bool
) -> web.StreamResponse:
    response = await _sse_response(request)
    error = _error_body(f"stream aborted for key {_sent_key(request)}", openai=openai)
    if openai:
        first = answers.chat_chunks(body, False)[0]
        await response.write(f"data: {json.dumps(first)}\n\n".encode())
        await response.write(f"data: {json.dumps(error)}\n\n".encode())
    else:
        await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
    return response


def _early_fault(fault: str, *, openai: bool, key: str = "") -> web.Response | None:
    """The error answers that replace a whole response."""
    if fault == "echo-key":
        message = f"Incorrect API key provided: {key}. You can find your API key at ..."
        body = _error_body(message, openai=openai, kind="invalid_request_error")
        return web.json_response(body, status=401)
    if fault == "echo-key-fragment":
        message = f"invalid api key ending in ...{key[-14:-2]}"
        return web.json_response(_error_body(message, openai=openai), status=401)
    if fault == "echo-key-text":
        return web.Response(text=f"401 Unauthorized: bad key {key}", status=401)
    if fault == "html":
        page = (
            "<html><body><h1>502</h1>internal-lb-7.corp.example: upstream pool empty</body></html>"
        )
        return web.Response(text=page, status=502, content_type="text/html")
    if fault in ("500", "503", "429"):
        status = int(fault)
        message = f"fake upstream fault {fault}"
        body = (
            {"error": {"message": message, "type": "server_error", "code": None, "param": None}}
            if openai
            else {"type": "error", "error": {"type": "api_error", "message": message}}
        )
        return web.json_response(body, status=status)
    if fault == "malformed":
        return web.Response(text="<html>bad gateway</html>", content_type="application/json")
    return None


def _reset(request: web.Request) -> None:
    """Close the connection with a reset (RST), as a crashing server or middlebox does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _sse_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


def serve(host: str, port: int) -> None:
    # A long-running process must not grow a log of every call.
    fake = FakeUpstream(keep_calls=False)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        pass
    web.run_app(fake.app(), host=host, port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
