"""Upstream error bodies, made safe to hand to the tenant.

An upstream's error goes back to the caller, but not as it came: a provider may echo the
key it was sent ("Incorrect API key provided: sk-proj-abc...xyz"), and an endpoint that is
not a model at all (an internal service behind a mistaken or hostile endpoint) answers
with its own error page. So the gateway rebuilds the body from the provider's error shape
only, and only the fields the SDKs read:

- OpenAI ``{"error": {"message", "type", "param", "code"}}`` and Anthropic ``{"type":
  "error", "error": {"type", "message"}}``: strings kept, everything else dropped;
- in every kept string, the configured key (whole, and any 8-character or longer piece of
  it), ``sk-...`` tokens, ``Bearer ...`` credentials, ``key=...`` pairs and other long
  opaque tokens are replaced by ``[redacted]``; messages are cut at
  :data:`MAX_MESSAGE` characters;
- a body that is not JSON, or JSON without that shape (an HTML page, a Kubernetes
  ``Status``), is replaced by a generic message naming the status.

Error events inside a stream (OpenAI ``data: {"error": ...}``, Anthropic ``event: error``,
the Responses API's ``error`` event and the ``error`` of its ``response.failed``) get the
same treatment as they pass (:func:`sanitize_stream_events`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from costwarden.api.routingpolicy import Provider

MAX_MESSAGE = 1024
MAX_FIELD = 128
MIN_FRAGMENT = 8
REDACTED = "[redacted]"

_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_*.\-]{3,}"),  # OpenAI / Anthropic keys, also masked (sk-ab***yz)
    re.compile(r"(?i)\bbearer\s+[^\s\"',;]+"),
    re.compile(
        r"(?i)\b(api[_-]?key|x-api-key|token|secret|password|authorization)"
        r"\s*[:=]\s*[^\s\"',;]+"
    ),
    re.compile(r"AIza[0-9A-Za-z_\-]{10,}"),  # Google API keys
    re.compile(r"[A-Za-z0-9_\-+/=]{32,}"),  # long opaque tokens (hex, base64, JWT parts)
)


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without any secret, piece of a secret or credential-looking token."""
    text = text[: MAX_MESSAGE * 4]
    for secret in secrets:
        if secret:
            text = _without_pieces(text, secret)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text


def _without_pieces(text: str, secret: str) -> str:
    """Replace every run of ``text`` covered by a MIN_FRAGMENT-long piece of ``secret``
    (or the whole secret, if it is shorter)."""
    size = min(MIN_FRAGMENT, len(secret))
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    covered = [False] * len(text)
    for start in range(len(text) - size + 1):
        if text[start : start + size] in pieces:
            for position in range(start, start + size):
                covered[position] = True
    if not any(covered):
        return text
    out: list[str] = []
    inside = False
    for char, hidden in zip(text, covered, strict=True):
        if hidden:
            if not inside:
                out.append(REDACTED)
            inside = True
        else:
            out.append(char)
            inside = False
    return "".join(out)


def generic_message(status: int) -> str:
    return (
        f"the upstream answered HTTP {status} without an error in the provider's format; "
        "its body is withheld"
    )


def _field(value: Any, secrets: tuple[str, ...], limit: int = MAX_FIELD) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return scrub(str(value), secrets)[:limit]


def sanitize_error(
    provider: Provider, status: int, body: bytes, secrets: tuple[str, ...] = ()
) -> bytes | None:
    """The error body to relay, rebuilt from the provider's shape; None when ``body`` has
    no such shape (the caller then answers with :func:`generic_message`)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    message = scrub(error["message"], secrets)
    kind = _field(error.get("type"), secrets) or "api_error"
    if provider is Provider.ANTHROPIC:
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    clean = {
        "message": message,
        "type": kind,
        "param": _field(error.get("param"), secrets),
        "code": _field(error.get("code"), secrets),
    }
    return orjson.dumps({"error": clean})


def sanitize_stream_events(provider: Provider, data: bytes, secrets: tuple[str, ...] = ()) -> bytes:
    """Whole SSE events as they pass: error events rebuilt, the others untouched."""
    if b"error" not in data:
        return data
    events = data.split(b"\n\n")
    for index, event in enumerate(events):
        if b"error" in event:
            events[index] = _sanitize_event(provider, event, secrets)
    return b"\n\n".join(events)


def _sanitize_event(provider: Provider, event: bytes, secrets: tuple[str, ...]) -> bytes:
    lines = event.split(b"\n")
    payload = b"\n".join(line[5:].lstrip() for line in lines if line.startswith(b"data:"))
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return event
    if isinstance(data, dict) and "error" not in data:
        kind = data.get("type")
        if kind == "error" or (
            kind == "response.failed" and isinstance(data.get("response"), dict)
        ):
            return _sanitize_responses_event(lines, data, secrets)
    if not isinstance(data, dict) or "error" not in data:
        return event  # an ordinary event that happens to contain the word
    clean = sanitize_error(provider, 502, payload, secrets)
    if clean is None:
        clean = _generic_body(provider, generic_message(502))
    prefix = b"event: error\n" if provider is Provider.ANTHROPIC else b""
    return prefix + b"data: " + clean


def _sanitize_responses_event(
    lines: list[bytes], data: dict[str, Any], secrets: tuple[str, ...]
) -> bytes:
    """A Responses API ``error`` event rebuilt from its fields, or the ``error`` of a
    ``response.failed`` event's response rebuilt in place; the ``event:`` line is kept."""
    head = b"".join(line + b"\n" for line in lines if line.startswith(b"event:"))
    sequence = data.get("sequence_number")
    sequence = sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else 0
    if data.get("type") == "error":
        clean: dict[str, Any] = {
            "type": "error",
            "code": _field(data.get("code"), secrets),
            "message": scrub(str(data.get("message") or ""), secrets),
            "param": _field(data.get("param"), secrets),
            "sequence_number": sequence,
        }
    else:
        response = dict(data["response"])
        error = response.get("error")
        if isinstance(error, dict):
            response["error"] = {
                "code": _field(error.get("code"), secrets),
                "message": scrub(str(error.get("message") or ""), secrets),
            }
        elif error is not None:
            response["error"] = None
        clean = data | {"response": response}
    return head + b"data: " + orjson.dumps(clean)


def _generic_body(provider: Provider, message: str) -> bytes:
    if provider is Provider.ANTHROPIC:
        return orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
    return orjson.dumps(
        {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    )
