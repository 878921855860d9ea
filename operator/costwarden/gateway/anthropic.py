"""The Anthropic wire format: messages (plain and the streaming SSE event sequence), errors.

Usage: ``input_tokens`` (uncached), ``cache_read_input_tokens``,
``cache_creation_input_tokens`` and ``output_tokens``. Cache writes are split by lifetime in
``cache_creation`` (``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``; their sum
is ``cache_creation_input_tokens``): 1-hour writes are billed at their own rate (2x input
against 1.25x), so they are metered apart (``cache_creation_1h``) and ``cache_creation``
keeps the rest. ``usage.service_tier`` (standard, priority, batch) is kept for the record
and for ``serviceTiers`` prices. In a stream, ``message_start``
carries the input side and a provisional output count, and ``message_delta`` the final
(cumulative) output count; a field repeated in ``message_delta`` replaces the earlier one.
Server tools billed per use (web search) are counted from ``usage.server_tool_use`` and
priced per call like the Responses API's ``web_search_call``.
The error body adds a ``code`` (costwarden's machine-readable reason) next to Anthropic's
``type`` and ``message``; the SDKs ignore fields they do not know.
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

DEFAULT_VERSION = "2023-06-01"
_FIELDS = {
    "input": "input_tokens",
    "cached_input": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "output": "output_tokens",
}
_ONE_HOUR = "_1h_written"
_LOOK = re.compile(rb"message_start|message_delta|message_stop|\"error\"")
# Server tools Anthropic runs and bills per use, from ``usage.server_tool_use``, by the
# name costwarden prices them under (the Responses API item type of the same tool).
_SERVER_TOOLS = {"web_search_requests": "web_search_call"}


def server_tool_calls(usage: Any) -> dict[str, int]:
    """Per-use billed server tool calls (``usage.server_tool_use``), e.g. web searches."""
    used = usage.get("server_tool_use") if isinstance(usage, dict) else None
    if not isinstance(used, dict):
        return {}
    counts: dict[str, int] = {}
    for field, kind in _SERVER_TOOLS.items():
        value = used.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts[kind] = value
    return counts


def parse_usage(usage: Any, *, required: tuple[str, ...] = ("input", "output")) -> dict[str, int]:
    """The counts ``usage`` carries, by TokenUsage field; ``_1h_written`` is the 1-hour part
    of the cache writes when reported (split off by :func:`usage_tokens`)."""
    if not isinstance(usage, dict):
        raise MalformedUsageError("the answer has no usage object")
    parts = {
        kind: usage_int(usage, key, required=kind in required)
        for kind, key in _FIELDS.items()
        if key in usage or kind in required
    }
    creation = usage.get("cache_creation")
    if isinstance(creation, dict):
        one_hour = usage_int(creation, "ephemeral_1h_input_tokens")
        if "cache_creation" not in parts:  # the breakdown alone: its sum is the total
            parts["cache_creation"] = usage_int(creation, "ephemeral_5m_input_tokens") + one_hour
        parts[_ONE_HOUR] = one_hour
    elif creation is not None:
        raise MalformedUsageError("usage.cache_creation is not an object")
    return parts


def usage_tokens(parts: dict[str, int]) -> TokenUsage:
    """TokenUsage of parsed counts, 1-hour cache writes apart from the 5-minute ones."""
    one_hour = parts.get(_ONE_HOUR, 0)
    written = parts.get("cache_creation", 0)
    if one_hour > written:
        raise MalformedUsageError(
            f"cache_creation.ephemeral_1h_input_tokens {one_hour} exceed "
            f"cache_creation_input_tokens {written}"
        )
    return tokens(
        parts["input"],
        parts["output"],
        parts.get("cached_input", 0),
        written - one_hour,
        one_hour,
    )


def usage_service_tier(usage: Any) -> str:
    return service_tier(usage.get("service_tier")) if isinstance(usage, dict) else ""


class AnthropicStreamMeter:
    """Collects usage from ``message_start`` and ``message_delta``; forwards every event."""

    __slots__ = (
        "_delta_seen",
        "_parts",
        "_splitter",
        "error",
        "finished",
        "service_tier",
        "tool_calls",
        "usage",
    )

    def __init__(self) -> None:
        self._splitter = SseSplitter()
        self._parts: dict[str, int] = {}
        self._delta_seen = False
        self.usage: TokenUsage | None = None
        self.tool_calls: dict[str, int] = {}
        self.service_tier = ""
        self.finished = False
        self.error = ""

    def feed(self, chunk: bytes) -> bytes:
        """Every byte goes on untouched and at once; only events that may carry usage are
        cut out (whole) and parsed."""
        if self._splitter.pending or not chunk.endswith(b"\n\n") or _LOOK.search(chunk):
            for event in self._splitter.events(chunk):
                if _LOOK.search(event):
                    self._inspect(event)
        return chunk

    def _inspect(self, event: bytes) -> None:
        try:
            data = sse_json_object(event)
            kind = data.get("type")
            if kind == "message_start":
                message = data.get("message")
                if not isinstance(message, dict):
                    raise MalformedUsageError("message_start carries no message object")
                usage = message.get("usage")
                self._parts = parse_usage(usage)
                self.tool_calls = server_tool_calls(usage) or self.tool_calls
                self.service_tier = usage_service_tier(usage)
            elif kind == "message_delta":
                usage = data.get("usage")
                self._parts.update(parse_usage(usage, required=("output",)))
                self.tool_calls = server_tool_calls(usage) or self.tool_calls  # cumulative
                self.service_tier = usage_service_tier(usage) or self.service_tier
                self._delta_seen = True
            elif kind == "message_stop":
                self.finished = True
            elif kind == "error":
                self.error = "the upstream reported an error mid-stream"
        except MalformedUsageError as exc:
            self.error = str(exc)

    def end(self) -> bytes:
        if self._splitter.overflowed and self.usage is None:
            self.error = self.error or OVERFLOW_ERROR
        if self._delta_seen and "input" in self._parts and not self.error:
            try:
                self.usage = usage_tokens(self._parts)
            except MalformedUsageError as exc:
                self.error = str(exc)
        elif not self.error:
            self.error = "the stream ended without usage in message_start and message_delta"
        return b""  # feed() already passed every byte on


class AnthropicFormat:
    provider = Provider.ANTHROPIC

    def error_body(self, status: int, code: str, message: str) -> bytes:
        error = {"type": error_type(status), "message": message, "code": code}
        return orjson.dumps({"type": "error", "error": error})

    def usage(self, answer: dict[str, Any], endpoint: Endpoint) -> TokenUsage:
        return usage_tokens(parse_usage(answer.get("usage")))

    def service_tier(self, answer: dict[str, Any]) -> str:
        return usage_service_tier(answer.get("usage"))

    def tool_calls(self, answer: dict[str, Any]) -> dict[str, int]:
        return server_tool_calls(answer.get("usage"))

    def prepare(self, body: dict[str, Any], endpoint: Endpoint) -> bool:
        return True  # Anthropic streams always carry usage; nothing to add or hide.

    def stream_meter(self, client_wants_usage: bool) -> AnthropicStreamMeter:
        return AnthropicStreamMeter()

    def upstream_headers(self, api_key: str, client: Mapping[str, str]) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": client.get("anthropic-version", DEFAULT_VERSION),
        }
        getall = getattr(client, "getall", None)
        betas = getall("anthropic-beta", ()) if getall else [client.get("anthropic-beta", "")]
        if beta := ",".join(b for b in betas if b):  # repeated headers: one list, in order
            headers["anthropic-beta"] = beta
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def stream_error_event(self, code: str, message: str) -> bytes:
        return b"event: error\ndata: " + self.error_body(502, code, message) + b"\n\n"


ANTHROPIC = AnthropicFormat()
