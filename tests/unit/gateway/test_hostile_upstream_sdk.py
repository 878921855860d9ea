"""Hostile upstream streams, through the official SDKs: each of the eight misbehaviours of
the fake upstream (HOSTILE_STREAMS) reaches the caller as an error the SDK raises, and is
charged (an estimate, usage reported), never delivered free at 200. And arbitrary upstream
streams (hypothesis) through the real gateway: metered, or charged an estimate."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costwarden.api.teambudget import LoopDetection
from costwarden.api.usage import Outcome
from costwarden.gateway.forward import charged_without_usage
from costwarden.gateway.wire import MAX_TOKENS_PER_CALL
from costwarden.testing.gateway import GatewayThread
from costwarden.testing.upstream import HOSTILE_STREAMS, FakeUpstream

from .conftest import StartGateway, records, wait_for
from .test_wire_fuzz import event_names, payloads, sse

PROMPT = "please summarise the quarterly report in three short bullet points"


UNTOUCHED_GARBAGE = ("stream-not-json", "stream-truncated")


def _drain(stream: Any) -> str:
    """Read a stream to its end; what the SDK raised, or "" if it raised nothing."""
    try:
        for _ in stream:
            pass
    except (openai.APIError, anthropic.APIError, json.JSONDecodeError) as exc:
        return type(exc).__name__ + ": " + str(exc)
    return ""


def _charged(gateway: GatewayThread, before: int) -> Any:
    sink = records(gateway)
    wait_for(lambda: len(sink.records) > before, what="the call's record")
    record = sink.records[-1]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED, record
    assert charged_without_usage(record.reason)
    assert record.usage_reported
    assert record.tokens.input > 0
    assert record.tokens.output > 0  # the streamed text, estimated
    assert record.cost_usd > 0
    return record


def _estimated(gateway: GatewayThread, model: str) -> float:
    """costwarden_gateway_estimated_usage_total for ``model``."""
    samples = gateway.gateway.metrics.estimated_usage.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels["model"] == model)


@pytest.mark.parametrize("fault", HOSTILE_STREAMS)
def test_openai_sdk_stream_from_a_hostile_upstream_is_charged_and_raised(
    gateway: GatewayThread, fake: FakeUpstream, fault: str
) -> None:
    fake.script("gpt-4o-mini", fault)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    before = len(records(gateway).records)
    estimated = _estimated(gateway, "gpt-4o-mini")

    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    raised = _drain(stream)

    assert "upstream_malformed" in raised or "without valid usage" in raised, raised
    _charged(gateway, before)
    assert _estimated(gateway, "gpt-4o-mini") == estimated + 1


@pytest.mark.parametrize("fault", HOSTILE_STREAMS)
def test_anthropic_sdk_stream_from_a_hostile_upstream_is_charged_and_raised(
    gateway: GatewayThread, fake: FakeUpstream, fault: str
) -> None:
    fake.script("claude-fake-sonnet", fault)
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    before = len(records(gateway).records)
    estimated = _estimated(gateway, "claude-sonnet")

    stream = client.messages.create(
        model="claude-fake-sonnet",
        max_tokens=50,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
    )
    raised = _drain(stream)

    if fault in UNTOUCHED_GARBAGE:
        # Anthropic events pass on untouched as they arrive: the SDK raises on the
        # upstream's own broken bytes before the gateway's error event comes.
        assert "JSONDecodeError" in raised or "without valid usage" in raised, raised
    else:
        assert "without valid usage" in raised, raised
    _charged(gateway, before)
    assert _estimated(gateway, "claude-sonnet") == estimated + 1


@pytest.mark.parametrize("fault", HOSTILE_STREAMS)
def test_responses_sdk_stream_from_a_hostile_upstream_is_charged_and_reported(
    gateway: GatewayThread, fake: FakeUpstream, fault: str
) -> None:
    fake.script("gpt-4o-mini", fault)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    before = len(records(gateway).records)
    estimated = _estimated(gateway, "gpt-4o-mini")

    stream = client.responses.create(model="gpt-4o-mini", input=PROMPT, stream=True)
    seen: list[Any] = []
    try:
        seen.extend(stream)
        raised = ""
    except (openai.APIError, json.JSONDecodeError) as exc:
        raised = type(exc).__name__

    # The Responses API's own error event (the SDK yields it typed), or, for bytes the
    # gateway passes on untouched as they arrive, the SDK's own error on them.
    errors = [e for e in seen if getattr(e, "type", "") == "error"]
    if raised:
        assert fault in UNTOUCHED_GARBAGE, raised
    else:
        assert errors, [getattr(e, "type", e) for e in seen]
        assert errors[-1].code == "upstream_malformed"
    _charged(gateway, before)
    assert _estimated(gateway, "gpt-4o-mini") == estimated + 1


# End to end: arbitrary upstream streams through the real gateway (sockets, relay, record).
RAW_ROUTES = {
    "chat": (
        "gpt-4o-mini",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": PROMPT}]},
    ),
    "messages": (
        "claude-fake-sonnet",
        "/v1/messages",
        {"max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]},
    ),
    "responses": ("gpt-4o-mini", "/v1/responses", {"input": PROMPT}),
}


@pytest.fixture
def fuzz_gateway(start_gateway: StartGateway) -> GatewayThread:
    """A gateway whose loop detection is off: the fuzz sends the same request many times."""
    return start_gateway(team={"loop_detection": LoopDetection(enabled=False)})


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(sorted(RAW_ROUTES)),
    events=st.lists(st.tuples(event_names, payloads), max_size=6),
    crlf=st.booleans(),
    cut=st.integers(min_value=0, max_value=4000),
)
def test_any_upstream_stream_is_metered_or_charged_never_free(
    fuzz_gateway: GatewayThread,
    fake: FakeUpstream,
    route: str,
    events: list[tuple[str, bytes]],
    crlf: bool,
    cut: int,
) -> None:
    gateway = fuzz_gateway
    model, path, body = RAW_ROUTES[route]
    stream = sse(events, crlf)
    fake.raw_streams.append(stream[: max(cut, len(stream) // 2)])
    fake.script(model, "raw-stream")
    sink = records(gateway)
    before = len(sink.records)

    response = httpx.post(
        gateway.url + path, json={**body, "model": model, "stream": True}, timeout=10
    )

    assert response.status_code == 200
    record = wait_for(lambda: sink.records[before:], what="the call's record")[-1]
    for value in (record.tokens.input, record.tokens.output, record.tokens.cached_input):
        assert 0 <= value <= MAX_TOKENS_PER_CALL
    if record.usage_reported:
        assert record.outcome in (Outcome.OK, Outcome.UPSTREAM_MALFORMED), record
        assert record.cost_usd >= 0
        if record.outcome is Outcome.UPSTREAM_MALFORMED:
            assert charged_without_usage(record.reason)
            assert record.cost_usd > 0
    else:  # only the provider's own failure (Responses response.failed) goes unbilled
        assert (record.outcome, record.reason) == (Outcome.UPSTREAM_ERROR, "upstream_failed")
