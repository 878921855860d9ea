"""The upstream slow, resetting connections and answering garbage (the fake upstream's
network faults): each call is either charged exactly what the upstream billed or answered
with an error and charged nothing, never served free."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from costwarden.api.usage import Outcome
from costwarden.testing.upstream import FakeUpstream

from .conftest import CHAT, records, wait_for

MODEL = "gpt-4o-mini"
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


def call(url: str, body: dict[str, Any], timeout: float = 10) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


@pytest.mark.parametrize(
    ("fault", "stream", "code"),
    [
        ("reset-before-answer", False, "upstream_unavailable"),
        ("reset-before-answer", True, "upstream_unavailable"),
        ("reset-mid-answer", False, "upstream_malformed"),
        ("garbage", False, "upstream_unavailable"),
        ("garbage", True, "upstream_unavailable"),
    ],
)
def test_an_answer_the_upstream_never_completed_is_an_error_charged_nothing(
    gateway: Any, fake: FakeUpstream, fault: str, stream: bool, code: str
) -> None:
    fake.script(MODEL, fault)
    response = call(gateway.url, STREAM if stream else CHAT)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == code
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    assert record.outcome in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_MALFORMED)
    assert record.cost_usd == 0
    assert not record.usage_reported
    assert [c.usage for c in fake.calls if c.fault == fault] == [None]  # billed nothing


def test_a_stream_reset_after_its_usage_is_delivered_and_charged_exactly(
    gateway: Any, fake: FakeUpstream
) -> None:
    fake.script(MODEL, "reset-mid-answer")
    response = call(gateway.url, STREAM)
    assert response.status_code == 200
    assert '"usage"' in response.text
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    billed = fake.calls[-1].usage
    assert billed is not None
    assert record.usage_reported
    assert record.tokens.output == billed["completion_tokens"]
    assert record.cost_usd > 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_slower_than_the_client_is_still_charged_what_the_upstream_bills(
    gateway: Any, fake: FakeUpstream, stream: bool
) -> None:
    fake.slow_answer_seconds = 1.0
    fake.script(MODEL, "slow-answer")
    with pytest.raises(httpx.ReadTimeout):
        call(gateway.url, STREAM if stream else CHAT, timeout=0.3)
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    billed = fake.calls[-1].usage
    assert billed is not None
    assert record.usage_reported
    assert record.tokens.output == billed["completion_tokens"]
    assert record.cost_usd > Decimal(0)


def test_the_mix_draws_every_fault_and_repeats_with_its_seed() -> None:
    mix = {"slow-answer": 0.1, "reset-before-answer": 0.1, "reset-mid-answer": 0.1, "garbage": 0.1}
    first, second = FakeUpstream(mix=mix), FakeUpstream(mix=mix)
    drawn = [first._fault(MODEL) for _ in range(400)]
    assert drawn == [second._fault(MODEL) for _ in range(400)]
    assert set(drawn) == {"", *mix}
