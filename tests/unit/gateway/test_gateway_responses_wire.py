"""The Responses API wire format (gateway/responses.py), per-call tool prices, the
Responses stream sanitiser and the unknown-route label, without sockets."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest

from costwarden.api.gatewayconfig import ResolvedPricing
from costwarden.api.routingpolicy import Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.gateway.metrics import MAX_UNKNOWN_PATHS, GatewayMetrics, route_label
from costwarden.gateway.responses import RESPONSES, ResponsesStreamMeter, parse_usage
from costwarden.gateway.sanitize import REDACTED, sanitize_stream_events
from costwarden.gateway.wire import MalformedUsageError
from costwarden.policy.pricing import call_cost
from costwarden.testing import answers

USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 10},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 130,
}


def test_usage_splits_cached_reads_and_writes_out_of_input() -> None:
    assert parse_usage(USAGE) == TokenUsage(input=50, cached_input=40, cache_creation=10, output=30)


def test_usage_without_details_is_all_uncached_input() -> None:
    assert parse_usage({"input_tokens": 7, "output_tokens": 2}) == TokenUsage(input=7, output=2)


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {"output_tokens": 1},
        {"input_tokens": 1},
        {"input_tokens": -1, "output_tokens": 1},
        {"input_tokens": 1.5, "output_tokens": 1},
        {"input_tokens": 5, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 6}},
        {"input_tokens": 5, "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 2}},
    ],
)
def test_malformed_usage_is_refused(usage: Any) -> None:
    with pytest.raises(MalformedUsageError):
        parse_usage(usage)


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def stream_of(body: dict[str, Any], ending: str = "response.completed") -> tuple[bytes, dict]:
    usage = answers.responses_usage(body)
    return sse(answers.responses_events(body, "resp_1", usage, ending)), usage


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
def test_stream_meter_passes_every_byte_and_reads_the_closing_usage(size: int) -> None:
    body = {"model": "m", "input": "hello there", "reasoning": {"effort": "low"}}
    data, usage = stream_of(body)
    meter = ResponsesStreamMeter()

    out = b"".join(meter.feed(data[i : i + size]) for i in range(0, len(data), size))
    out += meter.end()

    assert out == data
    assert meter.finished
    assert not meter.error
    assert meter.usage == parse_usage(usage)
    assert meter.response_id == "resp_1"


def test_stream_meter_counts_builtin_tool_calls() -> None:
    data, _ = stream_of({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})
    meter = ResponsesStreamMeter()
    meter.feed(data)
    meter.end()

    assert meter.tool_calls == {"web_search_call": 1}


def test_incomplete_stream_is_metered() -> None:
    data, usage = stream_of(
        {"model": "m", "input": "x", "max_output_tokens": 2}, "response.incomplete"
    )
    meter = ResponsesStreamMeter()
    meter.feed(data)
    meter.end()

    assert meter.usage == parse_usage(usage)
    assert meter.status == "incomplete"


def test_failed_stream_without_usage_is_a_provider_failure() -> None:
    body = {"model": "m", "input": "x"}
    data = sse(answers.responses_events(body, "resp_1", None, "response.failed"))
    meter = ResponsesStreamMeter()
    meter.feed(data)
    meter.end()

    assert meter.usage is None
    assert meter.failed
    assert meter.finished


def test_stream_without_closing_event_is_an_error() -> None:
    data, _ = stream_of({"model": "m", "input": "x"})
    cut = data[: data.index(b"event: response.completed")]
    meter = ResponsesStreamMeter()
    meter.feed(cut)
    meter.end()

    assert meter.usage is None
    assert not meter.failed
    assert "without response.completed" in meter.error


def test_error_event_has_the_responses_shape() -> None:
    event = RESPONSES.stream_error_event("upstream_malformed", "no usage")
    head, _, data = event.partition(b"\n")

    assert head == b"event: error"
    payload = orjson.loads(data.removeprefix(b"data: "))
    assert payload == {
        "type": "error",
        "code": "upstream_malformed",
        "message": "no usage",
        "param": None,
        "sequence_number": 0,
    }


def test_plain_answer_tool_calls_are_counted() -> None:
    body = {"model": "m", "input": "x", "tools": [{"type": "file_search"}]}
    answer = answers.response_object(body, "resp_1", answers.responses_usage(body), "completed")

    assert RESPONSES.tool_calls(answer) == {"file_search_call": 1}


def test_tool_calls_are_priced_per_call_exactly() -> None:
    pricing = ResolvedPricing.model_validate(
        {
            "inputPerMTokUSD": "2.50",
            "outputPerMTokUSD": "10",
            "cachedInputPerMTokUSD": "1.25",
            "cacheWritePerMTokUSD": "2.50",
            "toolCallUSD": {"web_search_call": "0.01", "file_search_call": "0.0025"},
        }
    )
    tokens = TokenUsage(input=1000, output=100, cached_input=1000)
    calls = {"web_search_call": 3, "file_search_call": 1, "code_interpreter_call": 2}

    tokens_only = call_cost(tokens, pricing)
    assert tokens_only == Decimal("0.00375") + Decimal("0.001")
    assert call_cost(tokens, pricing, calls) == tokens_only + Decimal("0.0325")


def test_responses_error_event_is_scrubbed_of_the_key() -> None:
    key = "sk-provider-secret-key-1234567890"
    event = sse([{"type": "error", "code": "x", "message": f"bad key {key}", "sequence_number": 4}])

    clean = sanitize_stream_events(Provider.OPENAI, event, (key,))

    assert key[:12] not in clean.decode()
    assert clean.startswith(b"event: error\n")
    payload = orjson.loads(clean.split(b"data: ", 1)[1].split(b"\n\n")[0])
    assert REDACTED in payload["message"]
    assert payload["sequence_number"] == 4


def test_response_failed_error_is_scrubbed_in_place() -> None:
    key = "sk-provider-secret-key-1234567890"
    body = {"model": "m", "input": "x"}
    events = answers.responses_events(body, "resp_1", None, "response.failed")
    events[-1]["response"]["error"]["message"] = f"key {key} refused"

    clean = sanitize_stream_events(Provider.OPENAI, sse(events), (key,))

    assert key[:12] not in clean.decode()
    assert b"event: response.failed\n" in clean
    assert clean.count(b"\n\n") == len(events)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/responses/resp_abc123/input_items", "/v1/responses/{id}/input_items"),
        ("/v1/messages/batches", "/v1/messages/batches"),
        ("/v1/files/file-xyz/content", "/v1/files/{id}/content"),
        ("/wp-admin/login.php", "other"),
        ("/", "other"),
        ("/v1/a/b/c/d/e/f/g", "other"),
    ],
)
def test_unknown_route_label(path: str, label: str) -> None:
    assert route_label(path) == label


def test_unknown_route_labels_are_capped() -> None:
    """Distinct normalised paths (API words in any order) stop at MAX_UNKNOWN_PATHS; the
    rest count under "other"; unknown methods are "OTHER"."""
    metrics = GatewayMetrics()
    words = ["files", "models", "images", "audio", "batches", "threads", "runs", "items", "jobs"]
    paths = [f"/v1/{a}/{b}" for a in words for b in words]  # 81 distinct labels
    for path in paths:
        metrics.unknown_route("GET", path)
    metrics.unknown_route("BREW", "/v1/chat/x1")
    lines = [
        line
        for line in metrics.exposition().decode().splitlines()
        if line.startswith("costwarden_gateway_unknown_route_total{")
    ]

    assert len(paths) > MAX_UNKNOWN_PATHS
    # The first MAX_UNKNOWN_PATHS labels, then "other" per method (at most 8 methods).
    assert len(lines) == MAX_UNKNOWN_PATHS + 2
    assert f'{{method="GET",path="other"}} {len(paths) - MAX_UNKNOWN_PATHS}.0' in "\n".join(lines)
    assert '{method="OTHER",path="other"} 1.0' in "\n".join(lines)
