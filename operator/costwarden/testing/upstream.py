"""A local upstream that speaks the OpenAI and Anthropic wire formats, for tests and demos.

Serves ``POST /v1/chat/completions`` (plain, ``stream`` with ``include_usage``, tool calls),
``POST /v1/embeddings``, ``GET /v1/models`` and Anthropic ``POST /v1/messages`` (plain and
the streaming SSE event sequence). Usage is realistic (OpenAI
``prompt_tokens_details.cached_tokens``; Anthropic ``cache_read_input_tokens`` and
``cache_creation_input_tokens``) and deterministic: :func:`prompt_tokens` of the request,
so a test can compute it. Every answer is logged in :attr:`FakeUpstream.calls` with the
usage exactly as reported.

Faults, for fallback and loop tests: a model id ``fault-<name>`` always fails that way, and
:meth:`FakeUpstream.script` (or ``POST /_fake/faults``) queues faults for a model. Fault
names: ``500``/``503``/``429`` (error status), ``malformed`` (200, not JSON), ``no-usage``
(200, no usage), ``slow`` (streams one chunk per 50 ms).

Run it as a process: ``python -m costwarden.testing.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

REPLY = "This is a deterministic reply from the fake upstream for your request ."
EMBEDDING_DIMENSIONS = 8
FAULT_PREFIX = "fault-"
_T = TypeVar("_T")


def count_words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts / blocks
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of a chat/messages prompt: 3 + per message (4 + words), 10 per tool, system too."""
    total = 3 + count_words(_text_of(body.get("system", "")))
    for message in body.get("messages", []):
        total += 4 + count_words(_text_of(message.get("content")))
    return total + 10 * len(body.get("tools") or [])


def cached_tokens(total_prompt: int) -> int:
    """Half the prompt is 'read from the cache': deterministic and never zero in tests."""
    return total_prompt // 2


def reply_words(body: dict[str, Any]) -> list[str]:
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 1000
    return REPLY.split()[: max(1, int(limit))]


def wants_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first tool offered, unless tool_choice says none."""
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") in ("none", {"type": "none"}):
        return None
    tool: dict[str, Any] = tools[0]
    return tool


def _tool_name(tool: dict[str, Any]) -> str:
    return str(tool.get("function", {}).get("name") or tool.get("name") or "tool")


TOOL_ARGUMENTS = '{"query": "weather in Paris"}'
TOOL_OUTPUT_TOKENS = 12


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


@dataclass
class FakeUpstream:
    """The fake provider; ``app()`` builds its aiohttp application."""

    calls: list[ServedCall] = field(default_factory=list)
    faults: dict[str, deque[str]] = field(default_factory=dict)
    chunk_delay: float = 0.0
    keep_calls: bool = True

    def script(self, model: str, *faults: str) -> None:
        """Queue faults for the next requests naming ``model`` (upstream id)."""
        self.faults.setdefault(model, deque()).extend(faults)

    def _fault(self, model: str) -> str:
        if model.startswith(FAULT_PREFIX):
            return model[len(FAULT_PREFIX) :]
        queue = self.faults.get(model)
        return queue.popleft() if queue else ""

    def _log(
        self, request: web.Request, body: dict[str, Any], usage: dict[str, Any] | None
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
                )
            )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/_fake/faults", self._set_faults)
        return app

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
        if early := _early_fault(fault, openai=True):
            self._log(request, body, None)
            return early
        usage: dict[str, Any] | None = None if fault == "no-usage" else _openai_usage(body)
        self._log(request, body, usage)
        if body.get("stream"):
            return await self._chat_stream(request, body, usage, slow=fault == "slow")
        return web.json_response(_chat_completion(body, usage))

    async def _chat_stream(
        self, request: web.Request, body: dict[str, Any], usage: dict[str, Any] | None, slow: bool
    ) -> web.StreamResponse:
        response = await _sse_response(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for chunk in _chat_chunks(body, include_usage):
            await self._send(response, f"data: {json.dumps(chunk)}\n\n", slow)
        if include_usage and usage is not None:
            final = _chunk_base(body) | {"choices": [], "usage": usage}
            await self._send(response, f"data: {json.dumps(final)}\n\n", slow)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _send(self, response: web.StreamResponse, text: str, slow: bool) -> None:
        delay = 0.05 if slow else self.chunk_delay
        if delay:
            await asyncio.sleep(delay)
        await response.write(text.encode())

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if early := _early_fault(fault, openai=True):
            self._log(request, body, None)
            return early
        inputs = body.get("input")
        items = (
            inputs
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], str)
            else [inputs]
        )
        tokens = sum(len(i) if isinstance(i, list) else count_words(str(i)) for i in items)
        usage = None if fault == "no-usage" else {"prompt_tokens": tokens, "total_tokens": tokens}
        self._log(request, body, usage)
        data = [_embedding(i, body.get("encoding_format")) for i in range(len(items))]
        result: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if usage is not None:
            result["usage"] = usage
        return web.json_response(result)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = self._fault(str(body.get("model", "")))
        if early := _early_fault(fault, openai=False):
            self._log(request, body, None)
            return early
        usage = _anthropic_usage(body)
        self._log(request, body, None if fault == "no-usage" else usage)
        if body.get("stream"):
            return await self._messages_stream(
                request, body, usage, slow=fault == "slow", no_usage=fault == "no-usage"
            )
        message = _anthropic_message(body, usage)
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
        for event in _anthropic_events(body, usage, no_usage=no_usage):
            text = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            await self._send(response, text, slow)
        return response


def _early_fault(fault: str, *, openai: bool) -> web.Response | None:
    """The error answers that replace a whole response."""
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


async def _sse_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def _openai_usage(body: dict[str, Any]) -> dict[str, Any]:
    prompt = prompt_tokens(body)
    completion = TOOL_OUTPUT_TOKENS if wants_tool(body) else len(reply_words(body))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chunk_base(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "system_fingerprint": "fp_fake",
    }


def _chat_completion(body: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    tool = wants_tool(body)
    message: dict[str, Any] = {"role": "assistant", "content": " ".join(reply_words(body))}
    finish = "stop"
    if tool is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(tool)]}
        finish = "tool_calls"
    result = _chunk_base(body) | {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        result["usage"] = usage
    return result


def _tool_call(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": _tool_name(tool), "arguments": TOOL_ARGUMENTS}
    return {"id": "call_fake", "type": "function", "function": function}


def _chat_chunks(body: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    base = _chunk_base(body)
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return base | {"choices": [choice]} | extra

    chunks = [chunk({"role": "assistant", "content": ""})]
    tool = wants_tool(body)
    if tool is not None:
        call = _tool_call(tool)
        head = {"index": 0, "id": call["id"], "type": "function"}
        chunks.append(
            chunk(
                {
                    "tool_calls": [
                        head | {"function": {"name": call["function"]["name"], "arguments": ""}}
                    ]
                }
            )
        )
        for part in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        chunks.append(chunk({}, "tool_calls"))
        return chunks
    for i, word in enumerate(reply_words(body)):
        chunks.append(chunk({"content": word if i == 0 else " " + word}))
    chunks.append(chunk({}, "stop"))
    return chunks


def _embedding(index: int, encoding: str | None) -> dict[str, Any]:
    vector = [round(0.1 * (index + 1) * (d + 1), 3) for d in range(EMBEDDING_DIMENSIONS)]
    value: Any = vector
    if encoding == "base64":
        value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return {"object": "embedding", "index": index, "embedding": value}


def _anthropic_usage(body: dict[str, Any]) -> dict[str, Any]:
    total = prompt_tokens(body)
    read = cached_tokens(total)
    creation = total // 4
    output = TOOL_OUTPUT_TOKENS if wants_tool(body) else len(reply_words(body))
    return {
        "input_tokens": total - read - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": output,
    }


def _anthropic_message(body: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    tool = wants_tool(body)
    content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(reply_words(body))}]
    stop = "end_turn"
    if tool is not None:
        content = [
            {
                "type": "tool_use",
                "id": "toolu_fake",
                "name": _tool_name(tool),
                "input": json.loads(TOOL_ARGUMENTS),
            }
        ]
        stop = "tool_use"
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": dict(usage),
    }


def _anthropic_events(
    body: dict[str, Any], usage: dict[str, Any], *, no_usage: bool
) -> list[dict[str, Any]]:
    message = _anthropic_message(body, usage)
    blocks = message.pop("content")
    # As the API does: message_start carries input usage and a provisional output count.
    message["usage"] = dict(usage) | {"output_tokens": 1}
    message["content"] = []
    message["stop_reason"] = None
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    if no_usage:
        del message["usage"]
    block = blocks[0]
    if block["type"] == "tool_use":
        events.append(
            {"type": "content_block_start", "index": 0, "content_block": block | {"input": {}}}
        )
        events.append({"type": "ping"})
        for part in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
            )
        stop = "tool_use"
    else:
        events.append(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
        events.append({"type": "ping"})
        for i, word in enumerate(block["text"].split()):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                }
            )
        stop = "end_turn"
    events.append({"type": "content_block_stop", "index": 0})
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if not no_usage:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    events.append(delta)
    events.append({"type": "message_stop"})
    return events


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, as the gateway runs in production."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a declared dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ServerThread:
    """Runs an aiohttp application on 127.0.0.1 in a thread with its own event loop.

    Tests use it to drive real sockets with the synchronous SDKs from the test thread.
    """

    def __init__(
        self, make_app: Callable[[], Awaitable[web.Application | web.Server] | web.Application]
    ):
        self._make_app = make_app
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.BaseRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
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
