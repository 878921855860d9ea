"""What both provider wire formats share: the format interface, SSE framing, usage errors.

Each format (``openai.py``, ``anthropic.py``) knows its error shape, where its usage
fields are, how to rewrite a request for a backend, and how to meter a stream. The proxy
speaks to them through :class:`WireFormat` only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from costwarden.api.routingpolicy import Provider, Sensitivity
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint

TASK_HEADER = "X-Costwarden-Task"
SENSITIVITY_HEADER = "X-Costwarden-Sensitivity"
SESSION_HEADER = "X-Costwarden-Session"
# Routing hints a client may put in the body's ``metadata`` instead of headers. The gateway
# consumes them and strips them before the body goes upstream: OpenAI only accepts
# ``metadata`` with ``store: true`` and Anthropic only accepts ``metadata.user_id``.
HINT_KEYS = ("task", "sensitivity")
_SENSITIVITIES = {s.value.lower(): s for s in Sensitivity}
BYTES_PER_TOKEN = 4
MAX_TOKENS_PER_CALL = 10_000_000
"""The most tokens one usage field of one call may report (10 million). The largest
context windows and outputs offered are a few million tokens; a count above this is an
upstream's bug or hostility (``10**30`` prompt tokens), refused as malformed usage rather
than billed or allowed to overflow a team's counters."""


class MalformedUsageError(ValueError):
    """The upstream's answer has no usable usage fields."""


class BadRequestError(ValueError):
    """The client's request cannot be routed as sent (HTTP 400)."""


@dataclass(slots=True)
class Hints:
    task: str
    sensitivity: Sensitivity
    session: str


def take_hints(headers: Mapping[str, str], body: dict[str, Any]) -> Hints:
    """Routing hints from headers (preferred) or ``metadata``; hints are removed from the body."""
    metadata = body.get("metadata")
    from_body: dict[str, Any] = {}
    if isinstance(metadata, dict) and any(k in metadata for k in HINT_KEYS):
        from_body = {k: metadata.pop(k) for k in HINT_KEYS if k in metadata}
        if not metadata:
            del body["metadata"]
    task = headers.get(TASK_HEADER) or str(from_body.get("task") or "")
    raw = headers.get(SENSITIVITY_HEADER) or str(from_body.get("sensitivity") or "Internal")
    sensitivity = _SENSITIVITIES.get(raw.strip().lower())
    if sensitivity is None:
        raise BadRequestError(
            f"{SENSITIVITY_HEADER} must be Public, Internal or Confidential, not {raw[:40]!r}"
        )
    return Hints(task.strip(), sensitivity, headers.get(SESSION_HEADER, ""))


def tokens(
    input: int,
    output: int,
    cached_input: int = 0,
    cache_creation: int = 0,
    cache_creation_1h: int = 0,
) -> TokenUsage:
    """A TokenUsage from counts already checked by :func:`usage_int` (no re-validation:
    pydantic's validators cost ~40 us a call, on every metered call)."""
    return TokenUsage.model_construct(
        input=input,
        output=output,
        cached_input=cached_input,
        cache_creation=cache_creation,
        cache_creation_1h=cache_creation_1h,
    )


_TIER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def service_tier(value: Any) -> str:
    """The ``service_tier`` an answer reports, or "" if it reports none (or something that
    is no tier name: priced at the standard prices, never trusted as a label)."""
    return value if isinstance(value, str) and _TIER.match(value) else ""


def estimate_prompt_tokens(body_size: int) -> int:
    """A coarse estimate (about 4 bytes a token) for rules with prompt-size bounds."""
    return body_size // BYTES_PER_TOKEN


def usage_int(usage: Mapping[str, Any], key: str, *, required: bool = False) -> int:
    value = usage.get(key)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedUsageError(f"usage.{key} is {_short(value)}, not a token count")
    if value > MAX_TOKENS_PER_CALL:
        raise MalformedUsageError(
            f"usage.{key} is {_short(value)}, over the {MAX_TOKENS_PER_CALL} tokens a call may "
            "report"
        )
    return value


def _short(value: Any) -> str:
    """A value for an error message, cut short (an upstream chooses it)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sse_json_object(event: bytes) -> dict[str, Any]:
    """The JSON object an SSE event carries; MalformedUsageError if it is not JSON or not an
    object (an array, a string, a number: no provider sends those)."""
    try:
        data = orjson.loads(sse_data(event))
    except orjson.JSONDecodeError:
        raise MalformedUsageError("the stream carried an event that is not JSON") from None
    if not isinstance(data, dict):
        raise MalformedUsageError("the stream carried an event that is not a JSON object")
    return data


class StreamMeter(Protocol):
    """Reads a server-sent event stream as it passes, and keeps what it reports."""

    usage: TokenUsage | None
    service_tier: str
    """The service tier the stream reported (see :func:`service_tier`), or ""."""
    finished: bool
    error: str

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on to the client for this chunk (whole events only)."""
        ...

    def end(self) -> bytes:
        """What is left when the upstream closes; sets ``error`` if usage never came."""
        ...


MAX_EVENT_BYTES = 16 * 2**20
"""The longest SSE event a stream meter holds while waiting for its end (16 MiB: a
Responses API closing event repeats the whole answer). An upstream that sends more without
a blank line has the partial event discarded, and the stream counts as without usage."""


class SseSplitter:
    """Cuts a byte stream into whole SSE events (separated by a blank line)."""

    __slots__ = ("_buffer", "overflowed")

    def __init__(self) -> None:
        self._buffer = b""
        self.overflowed = False
        """An event grew past MAX_EVENT_BYTES and was discarded."""

    def events(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk
        if b"\r\n" in data:  # the spec allows CRLF; normalize once so one separator is enough
            data = data.replace(b"\r\n", b"\n")
        parts = data.split(b"\n\n")
        self._buffer = parts.pop()
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._buffer, self.overflowed = b"", True
        return [p for p in parts if p]

    @property
    def pending(self) -> bool:
        """Part of an event is waiting for the rest of it."""
        return bool(self._buffer)

    def rest(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


OVERFLOW_ERROR = f"the stream carried an event over {MAX_EVENT_BYTES // 2**20} MiB"


def sse_data(event: bytes) -> bytes:
    """The ``data:`` payload of one event (joined if split over several lines)."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


class WireFormat(Protocol):
    """One provider's wire format as the proxy uses it."""

    provider: Provider

    def error_body(self, status: int, code: str, message: str) -> bytes: ...

    def usage(self, answer: dict[str, Any], endpoint: Endpoint) -> TokenUsage:
        """Tokens of a complete answer; raises MalformedUsageError if missing or invalid."""
        ...

    def tool_calls(self, answer: dict[str, Any]) -> dict[str, int]:
        """Provider-run tool calls billed per call in a complete answer, by kind."""
        ...

    def service_tier(self, answer: dict[str, Any]) -> str:
        """The service tier a complete answer reports it was served at, or ""."""
        ...

    def prepare(self, body: dict[str, Any], endpoint: Endpoint) -> bool:
        """Adjust the body for metering (once per call); return whether the client asked
        to see usage in a stream."""
        ...

    def stream_meter(self, client_wants_usage: bool) -> StreamMeter: ...

    def upstream_headers(self, api_key: str, client: Mapping[str, str]) -> dict[str, str]: ...

    def stream_error_event(self, code: str, message: str) -> bytes: ...


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error")
