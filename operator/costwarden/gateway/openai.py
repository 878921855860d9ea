"""The OpenAI wire format: chat completions (plain and streamed), embeddings, errors.

Usage comes from ``usage.prompt_tokens`` (of which ``prompt_tokens_details.cached_tokens``
were cache reads) and ``usage.completion_tokens``. A stream only reports usage when asked
(``stream_options.include_usage``): the gateway always asks, and drops the usage-only
final chunk again when the client did not ask for it. The ``"usage": null`` field the
provider then adds to every other chunk is left in place (the SDKs accept it). A stream
whose ``[DONE]`` comes before any usable usage has its ``[DONE]`` withheld: the gateway's
error event takes its place (the SDKs stop reading at ``[DONE]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from costwarden.api.routingpolicy import Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint
from costwarden.gateway.wire import (
    OVERFLOW_ERROR,
    MalformedUsageError,
    SseSplitter,
    error_type,
    service_tier,
    sse_json_object,
    tokens,
    usage_int,
)

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE = b"[DONE]"
# One C-level scan decides whether a chunk needs a closer look; most chunks are content.
_LOOK = re.compile(rb'"usage": ?\{|"error"|\[DONE\]')


def parse_usage(usage: Any, endpoint: Endpoint) -> TokenUsage:
    if not isinstance(usage, dict):
        raise MalformedUsageError("the answer has no usage object")
    prompt = usage_int(usage, "prompt_tokens", required=True)
    details = usage.get("prompt_tokens_details") or {}
    cached = usage_int(details, "cached_tokens") if isinstance(details, dict) else 0
    output = 0 if endpoint is Endpoint.EMBEDDINGS else usage_int(usage, "completion_tokens")
    if cached > prompt:
        raise MalformedUsageError(f"cached_tokens {cached} exceed prompt_tokens {prompt}")
    return tokens(prompt - cached, output, cached)


class OpenAIStreamMeter:
    """Finds the usage chunk of a chat stream; hides it if the client did not ask for it."""

    __slots__ = ("_show_usage", "_splitter", "error", "finished", "service_tier", "usage")

    def __init__(self, client_wants_usage: bool) -> None:
        self._show_usage = client_wants_usage
        self._splitter = SseSplitter()
        self.usage: TokenUsage | None = None
        self.service_tier = ""
        self.finished = False
        self.error = ""

    def feed(self, chunk: bytes) -> bytes:
        if not self._splitter.pending and chunk.endswith(b"\n\n") and not _LOOK.search(chunk):
            return chunk  # whole content events only: pass them on untouched
        out = [e for e in self._splitter.events(chunk) if self._keep(e)]
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _keep(self, event: bytes) -> bool:
        if _DONE in event:
            self.finished = True
            # Without usage the gateway ends the stream with an error event instead: the
            # SDKs stop reading at [DONE], so an error after it would never be raised.
            return self.usage is not None
        if not any(m in event for m in _USAGE_MARKERS) and b'"error"' not in event:
            return True
        try:
            data = sse_json_object(event)
            if data.get("error"):
                self.error = "the upstream reported an error mid-stream"
                return True  # the upstream's own error goes on (sanitised) to the client
            self.usage = parse_usage(data.get("usage"), Endpoint.CHAT_COMPLETIONS)
            # Every chunk repeats the tier; the usage chunk's is the one the call is billed at.
            self.service_tier = service_tier(data.get("service_tier"))
        except MalformedUsageError as exc:
            self.error = str(exc)
            return False  # broken bytes are not passed on: the gateway's error event follows
        return self._show_usage or bool(data.get("choices"))

    def end(self) -> bytes:
        if self._splitter.overflowed and self.usage is None:
            self.error = self.error or OVERFLOW_ERROR
        rest = self._splitter.rest().strip()
        if rest:  # an event the upstream did not terminate: metered, kept only if whole
            rest = rest + b"\n\n" if self._keep(rest) and b"data:" in rest else b""
        if self.usage is None and not self.error:
            self.error = "the stream ended without a usage chunk"
        return rest


class OpenAIFormat:
    provider = Provider.OPENAI

    def error_body(self, status: int, code: str, message: str) -> bytes:
        error = {"message": message, "type": error_type(status), "code": code, "param": None}
        return orjson.dumps({"error": error})

    def usage(self, answer: dict[str, Any], endpoint: Endpoint) -> TokenUsage:
        return parse_usage(answer.get("usage"), endpoint)

    def service_tier(self, answer: dict[str, Any]) -> str:
        return service_tier(answer.get("service_tier"))

    def tool_calls(self, answer: dict[str, Any]) -> dict[str, int]:
        return {}

    def prepare(self, body: dict[str, Any], endpoint: Endpoint) -> bool:
        if endpoint is not Endpoint.CHAT_COMPLETIONS or not body.get("stream"):
            return False
        options = body.get("stream_options")
        if not isinstance(options, dict):
            options = body["stream_options"] = {}
        wants = bool(options.get("include_usage"))
        options["include_usage"] = True
        return wants

    def stream_meter(self, client_wants_usage: bool) -> OpenAIStreamMeter:
        return OpenAIStreamMeter(client_wants_usage)

    def upstream_headers(self, api_key: str, client: Mapping[str, str]) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        for name in ("OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta"):
            if value := client.get(name):
                headers[name] = value
        return headers

    def stream_error_event(self, code: str, message: str) -> bytes:
        return b"data: " + self.error_body(502, code, message) + b"\n\n"


OPENAI = OpenAIFormat()
