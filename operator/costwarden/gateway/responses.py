"""The OpenAI Responses API wire format (``POST /v1/responses``), plain and streamed.

Usage is in ``response.usage``: ``input_tokens`` (all of the prompt, of which
``input_tokens_details.cached_tokens`` were cache reads and ``cache_write_tokens`` cache
writes) and ``output_tokens`` (reasoning tokens, ``output_tokens_details.reasoning_tokens``,
included: they are billed as output). A stream (``stream: true``) is a sequence of typed
events (``response.created``, ``response.output_text.delta``, ...) that ends with one of
``response.completed``, ``response.incomplete`` (both carry the whole response with its
usage) or ``response.failed`` (usage may be null: the provider bills nothing then). Every
byte is passed on untouched; only the closing events are parsed.

Tools the provider runs itself and bills per call appear as output items of their own
type (``web_search_call``, ``file_search_call``, ``code_interpreter_call``): they are
counted from ``response.output`` and priced per call (``toolCallUSD`` in the pricing).
HTTP errors use OpenAI's error shape; an error inside a stream is an ``error`` event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from costwarden.api.routingpolicy import Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.wire import (
    OVERFLOW_ERROR,
    MalformedUsageError,
    SseSplitter,
    service_tier,
    sse_json_object,
    tokens,
    usage_int,
)

BILLED_TOOL_ITEMS = frozenset({"web_search_call", "file_search_call", "code_interpreter_call"})
"""Output item types of provider-run tools billed per call."""
_LOOK = re.compile(rb"response\.completed|response\.incomplete|response\.failed|\"error\"")


def parse_usage(usage: Any) -> TokenUsage:
    """Tokens of a Responses API ``usage`` object (cached reads and writes split out)."""
    if not isinstance(usage, dict):
        raise MalformedUsageError("the response has no usage object")
    total_input = usage_int(usage, "input_tokens", required=True)
    output = usage_int(usage, "output_tokens", required=True)
    details = usage.get("input_tokens_details") or {}
    cached = usage_int(details, "cached_tokens") if isinstance(details, dict) else 0
    written = usage_int(details, "cache_write_tokens") if isinstance(details, dict) else 0
    out_details = usage.get("output_tokens_details") or {}
    reasoning = usage_int(out_details, "reasoning_tokens") if isinstance(out_details, dict) else 0
    if cached + written > total_input:
        raise MalformedUsageError(
            f"cached_tokens {cached} + cache_write_tokens {written} exceed input_tokens "
            f"{total_input}"
        )
    if reasoning > output:
        raise MalformedUsageError(f"reasoning_tokens {reasoning} exceed output_tokens {output}")
    return tokens(total_input - cached - written, output, cached, written)


def billed_tool_calls(response: Mapping[str, Any]) -> dict[str, int]:
    """Provider-run tool calls in a response's ``output``, by item type."""
    counts: dict[str, int] = {}
    output = response.get("output")
    if not isinstance(output, list):
        return counts
    for item in output:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in BILLED_TOOL_ITEMS:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


class ResponsesStreamMeter:
    """Reads the closing event of a Responses stream; forwards every byte at once."""

    __slots__ = (
        "_splitter",
        "error",
        "failed",
        "finished",
        "response_id",
        "service_tier",
        "status",
        "tool_calls",
        "usage",
    )

    def __init__(self) -> None:
        self._splitter = SseSplitter()
        self.usage: TokenUsage | None = None
        self.service_tier = ""
        self.tool_calls: dict[str, int] = {}
        self.response_id = ""
        self.status = ""
        self.finished = False
        self.failed = False
        """The stream ended in ``response.failed`` (or an ``error`` event) without usage:
        the provider's own failure, which it does not bill."""
        self.error = ""

    def feed(self, chunk: bytes) -> bytes:
        if self._splitter.pending or not chunk.endswith(b"\n\n") or _LOOK.search(chunk):
            for event in self._splitter.events(chunk):
                if _LOOK.search(event):
                    self._inspect(event)
        return chunk

    def _inspect(self, event: bytes) -> None:
        try:
            data = sse_json_object(event)
        except MalformedUsageError as exc:
            self.error = str(exc)
            return
        kind = data.get("type")
        if kind == "error":
            self.failed, self.finished = True, True
            self.error = "the upstream reported an error mid-stream"
            return
        if kind not in ("response.completed", "response.incomplete", "response.failed"):
            return
        response = data.get("response")
        if not isinstance(response, dict):
            self.error = f"{kind} carries no response object"
            return
        self.finished = True
        self.response_id = str(response.get("id") or "")
        self.status = str(response.get("status") or "")
        self.tool_calls = billed_tool_calls(response)
        self.service_tier = service_tier(response.get("service_tier"))
        if kind == "response.failed" and response.get("usage") is None:
            self.failed = True
            self.error = "the upstream reported response.failed"
            return
        try:
            self.usage = parse_usage(response.get("usage"))
        except MalformedUsageError as exc:
            self.error = str(exc)

    def end(self) -> bytes:
        if self._splitter.overflowed and self.usage is None:
            self.error = self.error or OVERFLOW_ERROR
        if self.usage is None and not self.error:
            self.error = (
                "the stream ended without response.completed, response.incomplete or "
                "response.failed"
            )
        return b""  # feed() already passed every byte on


class ResponsesFormat:
    """OpenAI's Responses API: OpenAI's error shape and headers, its own usage and events."""

    provider = Provider.OPENAI

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return OPENAI.error_body(status, code, message)

    def usage(self, answer: dict[str, Any], endpoint: Endpoint) -> TokenUsage:
        return parse_usage(answer.get("usage"))

    def service_tier(self, answer: dict[str, Any]) -> str:
        return service_tier(answer.get("service_tier"))

    def tool_calls(self, answer: dict[str, Any]) -> dict[str, int]:
        return billed_tool_calls(answer)

    def prepare(self, body: dict[str, Any], endpoint: Endpoint) -> bool:
        return True  # the closing event always carries usage; nothing to add or hide

    def stream_meter(self, client_wants_usage: bool) -> ResponsesStreamMeter:
        return ResponsesStreamMeter()

    def upstream_headers(self, api_key: str, client: Mapping[str, str]) -> dict[str, str]:
        return OPENAI.upstream_headers(api_key, client)

    def stream_error_event(self, code: str, message: str) -> bytes:
        """An ``error`` event as the Responses API streams it (the SDKs raise on it)."""
        event = {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": 0,
        }
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


RESPONSES = ResponsesFormat()
