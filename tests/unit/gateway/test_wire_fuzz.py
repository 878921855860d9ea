"""Property-based fuzzing of every wire parser: whatever an upstream sends, usage is either
correct or a clear error (MalformedUsageError / a meter's ``error``), never a crash, never
negative, never above wire.MAX_TOKENS_PER_CALL.

Parsers: OpenAI chat completions and embeddings (plain), the OpenAI chat stream, Anthropic
messages (plain and SSE), the Responses API (plain and SSE). Inputs: arbitrary bytes,
arbitrary JSON (with the keys the parsers look for over-represented), arbitrary SSE
framings (CRLF or LF, ``event:`` lines, split at arbitrary points) of arbitrary and of
well-formed events; for well-formed ones the usage must be exactly what was sent.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint
from costwarden.gateway.anthropic import ANTHROPIC
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.responses import RESPONSES
from costwarden.gateway.wire import (
    MAX_EVENT_BYTES,
    MAX_TOKENS_PER_CALL,
    MalformedUsageError,
    StreamMeter,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

USAGE_KEYS = [
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "cached_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "cache_write_tokens",
    "reasoning_tokens",
    "server_tool_use",
    "web_search_requests",
    "type",
    "message",
    "response",
    "error",
    "choices",
    "output",
]
EVENT_TYPES = [
    "message_start",
    "message_delta",
    "message_stop",
    "error",
    "response.completed",
    "response.incomplete",
    "response.failed",
]
counts = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=0, max_value=2 * MAX_TOKENS_PER_CALL),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)
scalars = st.one_of(counts, st.sampled_from(EVENT_TYPES), st.text(max_size=10))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(USAGE_KEYS), st.text(max_size=6)), inner, max_size=6
        ),
    ),
    max_leaves=30,
)


COUNT_KEYS = [k for k in USAGE_KEYS if k.endswith("_tokens") or k == "web_search_requests"]
# Usage objects shaped like the real ones, every count drawn from ``counts``: where absurd,
# negative and mistyped values in the right place are found.
usage_objects = st.fixed_dictionaries(
    {},
    optional={
        **{k: counts for k in COUNT_KEYS},
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": counts}),
        "input_tokens_details": st.fixed_dictionaries(
            {}, optional={"cached_tokens": counts, "cache_write_tokens": counts}
        ),
        "output_tokens_details": st.fixed_dictionaries({}, optional={"reasoning_tokens": counts}),
    },
)


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits: write them as JSON text allows
        import json

        return json.dumps(value).encode()


def assert_sane(usage: TokenUsage) -> None:
    for value in (usage.input, usage.output, usage.cached_input, usage.cache_creation):
        assert isinstance(value, int)
        assert not isinstance(value, bool)
        assert 0 <= value <= MAX_TOKENS_PER_CALL


def plain_usage(fmt: Any, answer: Any, endpoint: Endpoint) -> None:
    try:
        usage = fmt.usage(answer, endpoint)
    except MalformedUsageError as exc:
        message = str(exc)
        assert message, "an error without a message"
        return
    assert_sane(usage)
    fmt.tool_calls(answer)  # never raises either


@FUZZ
@given(st.dictionaries(st.sampled_from(USAGE_KEYS), json_values, max_size=4))
def test_plain_answers_yield_sane_usage_or_a_clear_error(answer: dict[str, Any]) -> None:
    for fmt, endpoint in (
        (OPENAI, Endpoint.CHAT_COMPLETIONS),
        (OPENAI, Endpoint.EMBEDDINGS),
        (ANTHROPIC, Endpoint.MESSAGES),
        (RESPONSES, Endpoint.RESPONSES),
    ):
        plain_usage(fmt, answer, endpoint)


@FUZZ
@given(st.one_of(usage_objects, json_values))
def test_any_usage_object_yields_sane_usage_or_a_clear_error(usage: Any) -> None:
    for fmt, endpoint in (
        (OPENAI, Endpoint.CHAT_COMPLETIONS),
        (OPENAI, Endpoint.EMBEDDINGS),
        (ANTHROPIC, Endpoint.MESSAGES),
        (RESPONSES, Endpoint.RESPONSES),
    ):
        plain_usage(fmt, {"usage": usage}, endpoint)


def meters() -> list[tuple[str, StreamMeter]]:
    return [
        ("openai", OPENAI.stream_meter(False)),
        ("openai-usage", OPENAI.stream_meter(True)),
        ("anthropic", ANTHROPIC.stream_meter(True)),
        ("responses", RESPONSES.stream_meter(True)),
    ]


def run_meter(meter: StreamMeter, stream: bytes, cuts: list[int]) -> bytes:
    points = sorted({min(c, len(stream)) for c in cuts})
    out, start = [], 0
    for point in [*points, len(stream)]:
        out.append(meter.feed(stream[start:point]))
        start = point
    out.append(meter.end())
    assert meter.usage is not None or meter.error, "no usage and no error"
    if meter.usage is not None:
        assert_sane(meter.usage)
    return b"".join(out)


cuts = st.lists(st.integers(min_value=0, max_value=4000), max_size=8)


@FUZZ
@given(st.binary(max_size=2000), cuts)
def test_arbitrary_bytes_never_crash_a_stream_meter(stream: bytes, points: list[int]) -> None:
    for _, meter in meters():
        run_meter(meter, stream, points)


def sse(events: list[tuple[str, bytes]], crlf: bool) -> bytes:
    newline = b"\r\n" if crlf else b"\n"
    parts = []
    for name, data in events:
        head = b"event: " + name.encode() + newline if name else b""
        parts.append(head + b"data: " + data + newline + newline)
    return b"".join(parts)


event_names = st.one_of(st.just(""), st.sampled_from(EVENT_TYPES))
payloads = st.one_of(
    json_values.map(_json),
    st.fixed_dictionaries(
        {"type": st.sampled_from(EVENT_TYPES)},
        optional={
            "usage": st.one_of(usage_objects, json_values),
            "message": st.one_of(st.fixed_dictionaries({"usage": usage_objects}), json_values),
            "response": st.one_of(st.fixed_dictionaries({"usage": usage_objects}), json_values),
            "error": json_values,
            "choices": json_values,
        },
    ).map(_json),
    st.binary(max_size=40),
    st.just(b"[DONE]"),
)


@FUZZ
@given(st.lists(st.tuples(event_names, payloads), max_size=8), st.booleans(), cuts)
def test_arbitrary_sse_framings_yield_sane_usage_or_a_clear_error(
    events: list[tuple[str, bytes]], crlf: bool, points: list[int]
) -> None:
    stream = sse(events, crlf)
    for _, meter in meters():
        run_meter(meter, stream, points)


token_counts = st.integers(min_value=0, max_value=MAX_TOKENS_PER_CALL)


@FUZZ
@given(token_counts, token_counts, st.data(), st.booleans(), cuts)
def test_well_formed_openai_stream_is_metered_exactly(
    prompt: int, output: int, data: st.DataObject, crlf: bool, points: list[int]
) -> None:
    cached = data.draw(st.integers(min_value=0, max_value=prompt))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    stream = sse(
        [
            ("", b'{"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'),
            ("", orjson.dumps({"choices": [], "usage": usage})),
            ("", b"[DONE]"),
        ],
        crlf,
    )
    meter = OPENAI.stream_meter(False)
    run_meter(meter, stream, points)
    assert meter.usage == TokenUsage(input=prompt - cached, output=output, cached_input=cached)


@FUZZ
@given(token_counts, token_counts, token_counts, token_counts, st.booleans(), cuts)
def test_well_formed_anthropic_stream_is_metered_exactly(
    fresh: int, read: int, written: int, output: int, crlf: bool, points: list[int]
) -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": fresh,
                "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written,
                "output_tokens": 1,
            }
        },
    }
    delta = {"type": "message_delta", "usage": {"output_tokens": output}}
    stream = sse(
        [
            ("message_start", orjson.dumps(start)),
            ("content_block_delta", b'{"type":"content_block_delta","delta":{"text":"hi"}}'),
            ("message_delta", orjson.dumps(delta)),
            ("message_stop", b'{"type":"message_stop"}'),
        ],
        crlf,
    )
    meter = ANTHROPIC.stream_meter(True)
    run_meter(meter, stream, points)
    assert meter.usage == TokenUsage(
        input=fresh, output=output, cached_input=read, cache_creation=written
    )


@FUZZ
@given(token_counts, token_counts, st.data(), st.booleans(), cuts)
def test_well_formed_responses_stream_is_metered_exactly(
    total: int, output: int, data: st.DataObject, crlf: bool, points: list[int]
) -> None:
    cached = data.draw(st.integers(min_value=0, max_value=total))
    usage = {
        "input_tokens": total,
        "output_tokens": output,
        "input_tokens_details": {"cached_tokens": cached},
    }
    done = {"type": "response.completed", "response": {"id": "r1", "usage": usage}}
    stream = sse(
        [
            ("response.output_text.delta", b'{"type":"response.output_text.delta","delta":"x"}'),
            ("response.completed", orjson.dumps(done)),
        ],
        crlf,
    )
    meter = RESPONSES.stream_meter(True)
    run_meter(meter, stream, points)
    assert meter.usage == TokenUsage(input=total - cached, output=output, cached_input=cached)


def test_a_json_array_event_is_an_error_not_a_crash() -> None:
    """The AttributeError paths found by reading: an array where an object belongs."""
    cases: list[tuple[StreamMeter, bytes]] = [
        (OPENAI.stream_meter(False), b'data: [{"usage":{"prompt_tokens":1}}]\n\n'),
        (ANTHROPIC.stream_meter(True), b'data: {"type":"message_start","message":[1]}\n\n'),
        (ANTHROPIC.stream_meter(True), b'data: {"type":"message_start","message":"x"}\n\n'),
        (RESPONSES.stream_meter(True), b'data: ["response.completed"]\n\n'),
    ]
    for meter, stream in cases:
        meter.feed(stream)
        meter.end()
        assert meter.usage is None
        assert meter.error


def test_absurd_counts_are_refused_not_billed() -> None:
    answer = {"usage": {"prompt_tokens": MAX_TOKENS_PER_CALL + 1, "completion_tokens": 1}}
    with pytest.raises(MalformedUsageError, match="over the"):
        OPENAI.usage(answer, Endpoint.CHAT_COMPLETIONS)
    at_bound = {"usage": {"prompt_tokens": MAX_TOKENS_PER_CALL, "completion_tokens": 0}}
    assert OPENAI.usage(at_bound, Endpoint.CHAT_COMPLETIONS).input == MAX_TOKENS_PER_CALL


def test_an_event_that_never_ends_is_discarded_past_the_bound() -> None:
    """A hostile upstream streaming without a blank line cannot grow a meter's buffer."""
    for _, meter in meters():
        splitter = meter._splitter  # type: ignore[attr-defined]
        piece = b'data: {"usage":{"prompt_tokens":1' + b"x" * 2**20
        for _ in range(MAX_EVENT_BYTES // 2**20 + 2):
            meter.feed(piece)
        assert len(splitter._buffer) <= MAX_EVENT_BYTES + len(piece)
        assert splitter.overflowed
        meter.end()
        assert meter.usage is None
        assert meter.error
