"""Charges beyond the plain token fields, through the official SDKs (issue #12): Anthropic's
1-hour cache writes and OpenAI's service tiers are charged exactly what the provider bills.

The fake upstream writes a quarter of an Anthropic prompt to the cache (to the 1-hour
cache when a breakpoint asks for ``ttl: 1h``) and reports the OpenAI tier a call asked
for. Every expected amount below is computed by hand from the prices in this file and
the usage the SDK parsed, never from costwarden's own pricing code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import openai
import pytest

from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.api.routingpolicy import ModelPricing, TierPricing
from costwarden.api.usage import Outcome, UsageRecord
from costwarden.gateway.sinks import MemorySink
from costwarden.testing.gateway import (
    GatewayThread,
    sample_config,
    with_pricing,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread

M = Decimal(1_000_000)
# gpt-4o-mini as declared in the policy here: standard, flex and priority prices.
STANDARD = (Decimal("0.15"), Decimal("0.60"), Decimal("0.075"))
TIERS = {
    "flex": (Decimal("0.075"), Decimal("0.30"), Decimal("0.0375")),
    "priority": (Decimal("0.25"), Decimal("1.00"), Decimal("0.125")),
}
MINI_PRICING = ModelPricing(
    input_per_m_tok_usd=STANDARD[0],
    output_per_m_tok_usd=STANDARD[1],
    cached_input_per_m_tok_usd=STANDARD[2],
    service_tiers={
        name: TierPricing(
            input_per_m_tok_usd=i, output_per_m_tok_usd=o, cached_input_per_m_tok_usd=c
        )
        for name, (i, o, c) in TIERS.items()
    },
)
# claude-sonnet (testing.gateway.CLAUDE_PRICING): 1-hour writes default to 2x input.
CLAUDE = (Decimal("3.00"), Decimal("15.00"), Decimal("0.30"), Decimal("3.75"), Decimal("6.00"))
LONG_SYSTEM = "You answer questions about the weather in European capitals. " * 20


def tiered_config(upstream: str) -> GatewayConfig:
    return with_pricing(sample_config(upstream), "gpt-4o-mini", MINI_PRICING)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayThread]:
    with ServerThread(FakeUpstream().app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        with GatewayThread(tiered_config(upstream.url), credentials_dir=credentials) as gw:
            yield gw


@pytest.fixture
def oai(gateway: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)


@pytest.fixture
def claude(gateway: GatewayThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="sk-client", max_retries=0)


def only_record(gateway: GatewayThread) -> UsageRecord:
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    deadline = time.monotonic() + 5
    while not sink.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == 1
    record = sink.records[0]
    assert record.outcome is Outcome.OK
    return record


def tier_cost(tier: str, prompt: int, cached: int, completion: int) -> Decimal:
    inp, out, cached_price = TIERS.get(tier, STANDARD)
    return ((prompt - cached) * inp + cached * cached_price + completion * out) / M


@pytest.mark.parametrize("tier", ["priority", "flex", "default"])
def test_openai_chat_is_charged_at_the_tier_the_answer_reports(
    gateway: GatewayThread, oai: openai.OpenAI, tier: str
) -> None:
    answer = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        service_tier=tier,  # type: ignore[arg-type]
    )
    assert answer.service_tier == tier
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    record = only_record(gateway)
    assert record.service_tier == tier
    assert record.cost_usd == tier_cost(tier, usage.prompt_tokens, cached, usage.completion_tokens)


def test_openai_stream_is_charged_at_its_tier(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        service_tier="priority",
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    record = only_record(gateway)
    assert record.service_tier == "priority"
    cached = usage.prompt_tokens_details.cached_tokens or 0
    expected = tier_cost("priority", usage.prompt_tokens, cached, usage.completion_tokens)
    assert record.cost_usd == expected
    assert expected > tier_cost("default", usage.prompt_tokens, cached, usage.completion_tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_is_charged_at_its_tier(
    gateway: GatewayThread, oai: openai.OpenAI, stream: bool
) -> None:
    if stream:
        with oai.responses.stream(
            model="gpt-4o-mini", input="Weather in Paris?", service_tier="flex"
        ) as events:
            response = events.get_final_response()
    else:
        response = oai.responses.create(
            model="gpt-4o-mini", input="Weather in Paris?", service_tier="flex"
        )
    assert response.service_tier == "flex"
    usage = response.usage
    assert usage is not None
    cached = usage.input_tokens_details.cached_tokens
    record = only_record(gateway)
    assert record.service_tier == "flex"
    assert record.cost_usd == tier_cost("flex", usage.input_tokens, cached, usage.output_tokens)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("ttl", ["1h", "5m"])
def test_anthropic_cache_writes_are_charged_by_their_lifetime(
    gateway: GatewayThread, claude: anthropic.Anthropic, stream: bool, ttl: str
) -> None:
    system = [
        {"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral", "ttl": ttl}}
    ]
    messages = [{"role": "user", "content": "Hello there"}]
    if stream:
        with claude.messages.stream(
            model="claude-fake-sonnet",
            max_tokens=100,
            system=system,  # type: ignore[arg-type]
            messages=messages,  # type: ignore[arg-type]
        ) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(
            model="claude-fake-sonnet",
            max_tokens=100,
            system=system,  # type: ignore[arg-type]
            messages=messages,  # type: ignore[arg-type]
        )
    usage = message.usage
    assert usage.cache_creation is not None
    one_hour = usage.cache_creation.ephemeral_1h_input_tokens
    five_minutes = usage.cache_creation.ephemeral_5m_input_tokens
    assert one_hour + five_minutes == usage.cache_creation_input_tokens > 0
    assert (one_hour > 0) is (ttl == "1h")
    inp, out, read, write, write_1h = CLAUDE
    expected = (
        usage.input_tokens * inp
        + usage.output_tokens * out
        + (usage.cache_read_input_tokens or 0) * read
        + five_minutes * write
        + one_hour * write_1h
    ) / M
    record = only_record(gateway)
    assert (record.tokens.cache_creation, record.tokens.cache_creation_1h) == (
        five_minutes,
        one_hour,
    )
    assert record.service_tier == usage.service_tier == "standard"
    assert record.cost_usd == expected
