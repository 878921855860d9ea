"""Stream meters: usage found across chunk boundaries, hidden or shown as the client asked."""

from __future__ import annotations

import orjson
import pytest

from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint
from costwarden.gateway.anthropic import ANTHROPIC
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.wire import MalformedUsageError

USAGE = {"prompt_tokens": 20, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 8}}
OPENAI_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":' + orjson.dumps(USAGE) + b"}\n\n"
    b"data: [DONE]\n\n"
)


def feed_in_pieces(meter: object, stream: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(stream[i : i + size]) for i in range(0, len(stream), size))  # type: ignore[attr-defined]
    return out + meter.end()  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_openai_usage_chunk_is_hidden_unless_asked(size: int) -> None:
    meter = OPENAI.stream_meter(client_wants_usage=False)

    out = feed_in_pieces(meter, OPENAI_STREAM, size)

    assert b'"choices":[]' not in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert meter.usage == TokenUsage(input=12, output=7, cached_input=8)


def test_openai_usage_chunk_is_kept_when_asked() -> None:
    meter = OPENAI.stream_meter(client_wants_usage=True)

    assert feed_in_pieces(meter, OPENAI_STREAM, 5) == OPENAI_STREAM


def test_openai_stream_without_usage_reports_an_error() -> None:
    meter = OPENAI.stream_meter(client_wants_usage=False)
    meter.feed(b'data: {"choices":[]}\n\ndata: [DONE]\n\n')
    meter.end()

    assert meter.usage is None
    assert "without a usage chunk" in meter.error


def test_anthropic_usage_from_start_and_delta() -> None:
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2,
        "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}
    stream = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in (start, delta, {"type": "message_stop"})
    )
    meter = ANTHROPIC.stream_meter(True)

    assert feed_in_pieces(meter, stream, 3) == stream
    assert meter.usage == TokenUsage(input=5, output=9, cached_input=3, cache_creation=2)


@pytest.mark.parametrize(
    "usage",
    [None, {"prompt_tokens": -1}, {"prompt_tokens": "12"}, {"prompt_tokens": 3,
     "prompt_tokens_details": {"cached_tokens": 4}}],
)  # fmt: skip
def test_invalid_openai_usage_is_malformed(usage: object) -> None:
    with pytest.raises(MalformedUsageError):
        OPENAI.usage({"usage": usage}, Endpoint.CHAT_COMPLETIONS)


def test_prepare_asks_for_stream_usage_and_remembers_the_client_wish() -> None:
    body: dict[str, object] = {"stream": True}
    assert OPENAI.prepare(body, Endpoint.CHAT_COMPLETIONS) is False
    assert body["stream_options"] == {"include_usage": True}
    asked: dict[str, object] = {"stream": True, "stream_options": {"include_usage": True}}
    assert OPENAI.prepare(asked, Endpoint.CHAT_COMPLETIONS) is True
