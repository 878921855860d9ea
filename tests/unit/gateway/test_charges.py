"""Charges beyond the plain token fields (issue #12): Anthropic's 1-hour cache writes and
the service tier an answer reports, metered from every answer shape, priced exactly, and
bounded by the reservation made before the call."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from costwarden.api.catalog import default_catalog
from costwarden.api.routingpolicy import ModelBackend, ModelPricing, Provider, TierPricing
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint
from costwarden.gateway.anthropic import ANTHROPIC, AnthropicStreamMeter
from costwarden.gateway.openai import OpenAIFormat, OpenAIStreamMeter
from costwarden.gateway.responses import ResponsesFormat, ResponsesStreamMeter
from costwarden.gateway.wire import MalformedUsageError
from costwarden.policy import reservation as reserve
from costwarden.policy.pricing import call_cost, resolve_pricing
from costwarden.store.schema import Pricing, row_of

M = Decimal(1_000_000)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def anthropic_usage(five: int, one_hour: int, **extra: Any) -> dict[str, Any]:
    return {
        "input_tokens": 100,
        "cache_read_input_tokens": 20,
        "cache_creation_input_tokens": five + one_hour,
        "cache_creation": {
            "ephemeral_5m_input_tokens": five,
            "ephemeral_1h_input_tokens": one_hour,
        },
        "output_tokens": 7,
        **extra,
    }


def backend(provider: Provider, pricing: ModelPricing | None = None, upstream: str = "x") -> Any:
    return ModelBackend(
        name="m",
        provider=provider,
        endpoint="https://api.example.com/v1",
        upstream_model=upstream,
        pricing=pricing,
    )


SONNET = resolve_pricing(backend(Provider.ANTHROPIC, upstream="claude-sonnet-4-5"),
                         default_catalog())  # fmt: skip
TIERED_PRICING = ModelPricing(
    input_per_m_tok_usd=Decimal("1.25"),
    output_per_m_tok_usd=Decimal("10.00"),
    cached_input_per_m_tok_usd=Decimal("0.125"),
    service_tiers={
        "flex": TierPricing(
            input_per_m_tok_usd=Decimal("0.625"),
            output_per_m_tok_usd=Decimal("5.00"),
            cached_input_per_m_tok_usd=Decimal("0.0625"),
        ),
        "priority": TierPricing(
            input_per_m_tok_usd=Decimal("2.50"),
            output_per_m_tok_usd=Decimal("20.00"),
            cached_input_per_m_tok_usd=Decimal("0.25"),
        ),
    },
)
TIERED = resolve_pricing(backend(Provider.OPENAI, TIERED_PRICING), default_catalog())


# --- Anthropic 1-hour cache writes -------------------------------------------------------


def test_anthropic_message_splits_cache_writes_by_lifetime():
    answer = {"usage": anthropic_usage(30, 50, service_tier="standard")}
    tokens = ANTHROPIC.usage(answer, Endpoint.MESSAGES)
    assert (tokens.input, tokens.cached_input, tokens.output) == (100, 20, 7)
    assert (tokens.cache_creation, tokens.cache_creation_1h) == (30, 50)
    assert ANTHROPIC.service_tier(answer) == "standard"


def test_anthropic_usage_without_the_breakdown_is_all_5_minute_writes():
    usage = anthropic_usage(0, 0)
    del usage["cache_creation"]
    usage["cache_creation_input_tokens"] = 40
    tokens = ANTHROPIC.usage({"usage": usage}, Endpoint.MESSAGES)
    assert (tokens.cache_creation, tokens.cache_creation_1h) == (40, 0)


@pytest.mark.parametrize(
    "creation", [{"ephemeral_1h_input_tokens": 90}, {"ephemeral_1h_input_tokens": -1}, "lots"]
)
def test_anthropic_1h_writes_that_do_not_add_up_are_malformed(creation: Any):
    usage = anthropic_usage(30, 50) | {"cache_creation": creation}
    with pytest.raises(MalformedUsageError):
        ANTHROPIC.usage({"usage": usage}, Endpoint.MESSAGES)


def test_anthropic_stream_meters_1h_writes_from_message_start():
    meter = AnthropicStreamMeter()
    usage = anthropic_usage(0, 64, service_tier="priority") | {"output_tokens": 1}
    meter.feed(sse({"type": "message_start", "message": {"usage": usage}}))
    meter.feed(sse({"type": "message_delta", "usage": {"output_tokens": 9}}))
    meter.feed(sse({"type": "message_stop"}))
    meter.end()
    assert meter.usage == TokenUsage(
        input=100, cached_input=20, cache_creation=0, cache_creation_1h=64, output=9
    )
    assert meter.service_tier == "priority"


def test_1h_writes_are_priced_at_twice_input_for_anthropic_models():
    assert SONNET is not None
    assert SONNET.cache_write_1h_per_m_tok_usd == Decimal("6.00")  # the catalogue's entry
    tokens = TokenUsage(input=100, cached_input=20, cache_creation=30, cache_creation_1h=50,
                        output=7)  # fmt: skip
    expected = (100 * Decimal("3.00") + 20 * Decimal("0.30") + 30 * Decimal("3.75")
                + 50 * Decimal("6.00") + 7 * Decimal("15.00")) / M  # fmt: skip
    assert call_cost(tokens, SONNET) == expected
    declared = ModelPricing(input_per_m_tok_usd=Decimal("0.80"), output_per_m_tok_usd=Decimal(4))
    own = resolve_pricing(backend(Provider.ANTHROPIC, declared), default_catalog())
    assert own is not None
    assert own.cache_write_1h_per_m_tok_usd == Decimal("1.60")
    # Other providers write no 1-hour entries: their price never makes a reservation dearer.
    openai = resolve_pricing(backend(Provider.OPENAI, declared), default_catalog())
    assert openai is not None
    assert openai.cache_write_1h_per_m_tok_usd == openai.cache_write_per_m_tok_usd


# --- service tiers -----------------------------------------------------------------------


def test_openai_chat_reports_its_tier_plain_and_streamed():
    answer = {"service_tier": "flex", "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
    assert OpenAIFormat().service_tier(answer) == "flex"
    meter = OpenAIStreamMeter(client_wants_usage=True)
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}], "service_tier": "priority"}
    final = {"choices": [], "service_tier": "priority", "usage": answer["usage"]}
    meter.feed(sse(chunk, final) + b"data: [DONE]\n\n")
    meter.end()
    assert meter.usage is not None
    assert meter.service_tier == "priority"


@pytest.mark.parametrize("reported", [None, "", "Priority!", 3, "x" * 40])
def test_a_tier_that_is_no_tier_name_is_ignored(reported: Any):
    assert OpenAIFormat().service_tier({"service_tier": reported}) == ""


def test_responses_report_their_tier_plain_and_streamed():
    usage = {"input_tokens": 10, "output_tokens": 3}
    response = {"id": "resp_1", "status": "completed", "service_tier": "flex", "usage": usage}
    assert ResponsesFormat().service_tier(response) == "flex"
    meter = ResponsesStreamMeter()
    meter.feed(sse({"type": "response.completed", "response": response}))
    meter.end()
    assert meter.usage is not None
    assert meter.service_tier == "flex"


def test_tokens_are_priced_at_the_reported_tier_and_unknown_tiers_at_standard_prices():
    assert TIERED is not None
    tokens = TokenUsage(input=1000, cached_input=200, output=300)
    standard = (1000 * Decimal("1.25") + 200 * Decimal("0.125") + 300 * Decimal(10)) / M
    flex = (1000 * Decimal("0.625") + 200 * Decimal("0.0625") + 300 * Decimal(5)) / M
    priority = (1000 * Decimal("2.50") + 200 * Decimal("0.25") + 300 * Decimal(20)) / M
    assert call_cost(tokens, TIERED) == standard
    assert call_cost(tokens, TIERED, service_tier="default") == standard
    assert call_cost(tokens, TIERED, service_tier="scale") == standard
    assert call_cost(tokens, TIERED, service_tier="flex") == flex
    assert call_cost(tokens, TIERED, service_tier="priority") == priority
    # A tier's unset cached and cache-write prices default to that tier's input price.
    assert TIERED.service_tiers["flex"].cache_write_per_m_tok_usd == Decimal("0.625")


@pytest.mark.parametrize("name", ["auto", "Flex", "", "a" * 33])
def test_a_tier_an_answer_never_reports_is_refused_in_the_policy(name: str):
    tier = TierPricing(input_per_m_tok_usd=Decimal(1), output_per_m_tok_usd=Decimal(1))
    with pytest.raises(ValidationError):
        ModelPricing(input_per_m_tok_usd=Decimal(1), output_per_m_tok_usd=Decimal(1),
                     service_tiers={name: tier})  # fmt: skip


# --- reservations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "tier"),
    [({}, None), ({"service_tier": "auto"}, None), ({"service_tier": "flex"}, "flex"),
     ({"service_tier": 7}, None), ({"service_tier": "standard_only"}, "standard_only")],
)  # fmt: skip
def test_the_requested_tier(body: dict[str, Any], tier: str | None):
    assert reserve.requested_tier(body) == tier


@pytest.mark.parametrize(
    ("asked", "dearest"),
    [(None, "priority"), ("priority", "priority"), ("flex", ""), ("default", ""), ("scale", "")],
)
def test_the_reservation_bounds_the_charge_at_every_tier_the_call_may_be_served_at(
    asked: str | None, dearest: str
):
    """Reserved at the dearest tier the call may be served at (no tier or auto: any; a
    named tier: that one or the standard prices); whatever tier the answer then reports
    among those, the charge is within the reservation, and the dearest one reaches it."""
    assert TIERED is not None
    prompt, ceiling = 500, 200
    worst = reserve.worst_cost(prompt, ceiling, TIERED, asked)
    may_serve = {"", asked} if asked is not None else {"", "flex", "priority", "default"}
    for reported in may_serve:
        for used in (TokenUsage(input=prompt, output=ceiling),
                     TokenUsage(cached_input=prompt, output=ceiling),
                     TokenUsage(cache_creation=prompt, output=ceiling),
                     TokenUsage(cache_creation_1h=prompt, output=ceiling)):  # fmt: skip
            assert call_cost(used, TIERED, service_tier=reported) <= worst
    charged = reserve.charged_tokens(reserve.WorstCase(prompt, ceiling, worst, asked))
    tier = reserve.dearest_tier(charged, TIERED, asked)
    assert tier == dearest
    assert call_cost(charged, TIERED, service_tier=tier) == worst


def test_anthropic_reservations_bound_1h_cache_writes():
    assert SONNET is not None
    worst = reserve.worst_cost(1000, 100, SONNET)
    assert worst == (1000 * Decimal("6.00") + 100 * Decimal("15.00")) / M
    assert call_cost(TokenUsage(cache_creation_1h=1000, output=100), SONNET) == worst


# --- the store --------------------------------------------------------------------------


def test_the_store_keeps_1h_writes_and_the_tier_and_leaves_no_phantom_tool_cost():
    from datetime import UTC, datetime

    from costwarden.api.usage import Outcome, UsageRecord

    assert SONNET is not None
    tokens = TokenUsage(input=100, cached_input=20, cache_creation=30, cache_creation_1h=50,
                        output=7)  # fmt: skip
    record = UsageRecord(time=datetime.now(UTC), endpoint=Endpoint.MESSAGES, tokens=tokens,
                         usage_reported=True, cost_usd=call_cost(tokens, SONNET),
                         outcome=Outcome.OK, service_tier="standard")  # fmt: skip
    rates = SONNET.rates("standard")
    pricing = Pricing(rates.input, rates.output, rates.cached_input, rates.cache_write,
                      cache_write_1h=rates.cache_write_1h)  # fmt: skip
    row = row_of(record, source="gw", seq=1, pricing=pricing)
    assert row["cache_creation_tokens"] == 30
    assert row["cache_creation_1h_tokens"] == 50
    assert row["cache_write_1h_price_per_m_usd"] == Decimal("6.00")
    assert row["service_tier"] == "standard"
    assert row["tool_cost_usd"] == 0


# --- a call whose usage never came, through a gateway -----------------------------------


@pytest.mark.parametrize(("asked", "charged_at"),
                         [("priority", "priority"), (None, "priority"), ("flex", "")])  # fmt: skip
def test_a_stream_without_usage_is_charged_its_reservation_at_the_dearest_tier(
    start_gateway: Any, upstream: Any, fake: Any, asked: str | None, charged_at: str
):
    """The reservation's tokens at the dearest tier the call may be served at, recorded
    with that tier, so the operator's recomputation gives the same amount."""
    import httpx
    import orjson

    from costwarden.api.usage import Outcome
    from costwarden.testing.gateway import sample_config, with_pricing

    from .conftest import CHAT, records, wait_for

    gateway = start_gateway(with_pricing(sample_config(upstream.url), "gpt-4o-mini",
                                         TIERED_PRICING))  # fmt: skip
    fake.script("gpt-4o-mini", "no-usage")
    body = {**CHAT, "stream": True, "max_tokens": 300}
    if asked is not None:
        body["service_tier"] = asked
    with httpx.Client(timeout=10) as client:
        client.post(gateway.url + "/v1/chat/completions", content=orjson.dumps(body),
                    headers={"Content-Type": "application/json"}).read()  # fmt: skip
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    assert TIERED is not None
    prompt = reserve.prompt_token_bound(orjson.dumps(body))
    assert record.service_tier == charged_at
    assert record.cost_usd == reserve.worst_cost(prompt, 300, TIERED, asked)
    assert record.cost_usd == call_cost(record.tokens, TIERED, service_tier=record.service_tier)
