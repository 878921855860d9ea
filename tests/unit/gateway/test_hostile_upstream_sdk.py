"""Hostile upstream streams, through the official SDKs: each of the eight misbehaviours of
the fake upstream (HOSTILE_STREAMS) reaches the caller as an error the SDK raises, and is
charged (an estimate, usage reported), never delivered free at 200."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from costwarden.api.usage import Outcome
from costwarden.testing.gateway import GatewayThread
from costwarden.testing.upstream import HOSTILE_STREAMS, FakeUpstream

from .conftest import records, wait_for

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
    assert record.reason == "usage_estimated"
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
