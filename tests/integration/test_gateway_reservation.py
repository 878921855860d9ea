"""Caps that hold under concurrency (issue #12, one gateway process): the official openai
SDK, 100 concurrent calls with a large ``max_tokens`` against a slow upstream whose
answers run to their ceiling, at the cap.

What is checked is the money the upstream billed (its own usage, priced exactly), not the
gateway's view of it: settled spend never exceeds the cap, the refused calls carry the
reason ``budget_reservation_failed``, and the same load without reservation overspends
(so the scenario is one that would fail without it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from costwarden.api.gatewayconfig import GatewayConfig, PolicyConfig, SpendState, TeamConfig
from costwarden.api.routingpolicy import ModelPricing
from costwarden.api.teambudget import ModelCap, Period, PerJobLimits
from costwarden.api.usage import Outcome, UsageRecord
from costwarden.gateway.sinks import MemorySink
from costwarden.policy import reservation as reserve
from costwarden.policy.pricing import call_cost
from costwarden.testing.gateway import (
    NAMESPACE,
    POLICY_ID,
    TEAM_ID,
    GatewayThread,
    model,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread

CALLS = 100
MAX_TOKENS = 2000
LATENCY = 0.5  # seconds the upstream takes: every call is in flight at once
MINI = ModelPricing(input_per_m_tok_usd=Decimal("0.15"), output_per_m_tok_usd=Decimal("0.60"))
BIG = ModelPricing(input_per_m_tok_usd=Decimal("2.50"), output_per_m_tok_usd=Decimal("10.00"))
HARD_CAP = Decimal(10)
MICRO = Decimal("0.000001")


def body(i: int) -> dict[str, Any]:
    # Distinct prompts (identical ones would trip loop detection), all of the same size.
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"question {i:04d}"}],
        "max_tokens": MAX_TOKENS,
    }


def config(
    upstream: str, *, spent: Decimal = Decimal(0), mini: str = "fault-verbose", **team: Any
) -> GatewayConfig:
    """Two models answered verbosely (upstream id ``fault-verbose``: every answer runs to
    its max_tokens), priced as gpt-4o-mini ("mini", the default) and gpt-4o ("big")."""
    models = [
        model("mini", upstream, upstream_model=mini, pricing=MINI),
        model("big", upstream, upstream_model="fault-verbose", pricing=BIG),
    ]
    policy = PolicyConfig.model_validate(
        {
            "id": POLICY_ID,
            "models": [m.model_dump(by_alias=True) for m in models],
            "defaultModel": "mini",
            "rules": [{"name": "big", "match": {"tasks": ["big"]}, "model": "big"}],
        }
    )
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": TEAM_ID,
        "namespaces": [NAMESPACE],
        "period": Period(),
        "hard_cap_usd": HARD_CAP,
        "soft_limit_usd": HARD_CAP,
        "routing_policy": POLICY_ID,
        "spend": SpendState(
            spent_usd=spent,
            period_start=now - timedelta(days=1),
            period_end=now + timedelta(days=29),
        ),
    }
    values.update(team)
    return GatewayConfig(teams=[TeamConfig(**values)], policies=[policy], revision="rev-1")


def worst(pricing: ModelPricing) -> Decimal:
    """The reservation of one :func:`body` call (compact JSON, as the SDK sends it)."""
    resolved = model("x", "http://x", upstream_model="x", pricing=pricing).pricing
    prompt = reserve.prompt_token_bound(orjson.dumps(body(0)))
    return reserve.worst_cost(prompt, MAX_TOKENS, resolved)


def room(pricing: ModelPricing, calls: float) -> Decimal:
    return (worst(pricing) * Decimal(str(calls))).quantize(MICRO, ROUND_CEILING)


@dataclass
class Outcomes:
    ok: int
    refused: list[openai.APIStatusError]


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(latency=LATENCY)


@pytest.fixture
def upstream(fake: FakeUpstream) -> Iterator[ServerThread]:
    with ServerThread(fake.app) as server:
        yield server


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    return write_credentials(tmp_path / "credentials")


def start(cfg: GatewayConfig, credentials: Path, *, reserving: bool = True) -> GatewayThread:
    gateway = GatewayThread(cfg, credentials_dir=credentials)
    gateway.gateway.reserving = reserving
    return gateway.__enter__()


def fire(gateway: GatewayThread, first: int, headers: dict[str, str] | None = None) -> Outcomes:
    """:data:`CALLS` concurrent chat completions through the official async SDK."""

    async def run() -> Outcomes:
        client = openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=60
        )
        async with client:

            async def one(i: int) -> openai.APIStatusError | None:
                try:
                    await client.chat.completions.create(**body(i), extra_headers=headers)
                except openai.APIStatusError as exc:
                    return exc
                return None

            results = await asyncio.gather(*(one(first + i) for i in range(CALLS)))
        refused = [r for r in results if r is not None]
        return Outcomes(CALLS - len(refused), refused)

    return asyncio.run(run())


def billed(fake: FakeUpstream, pricing: ModelPricing) -> Decimal:
    """What the upstream billed: its own reported usage, priced exactly."""
    resolved = model("x", "http://x", upstream_model="x", pricing=pricing).pricing
    total = Decimal(0)
    for call in fake.calls:
        assert call.usage is not None
        cached = call.usage["prompt_tokens_details"]["cached_tokens"]
        tokens = reserve.charged_tokens(
            reserve.WorstCase(
                call.usage["prompt_tokens"] - cached, call.usage["completion_tokens"], Decimal(0)
            )
        ).model_copy(update={"cached_input": cached})
        total += call_cost(tokens, resolved)
    return total


def settled_records(gateway: GatewayThread, expected: int) -> list[UsageRecord]:
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    deadline = time.monotonic() + 10
    while len(sink.records) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == expected
    return list(sink.records)


def assert_refused_for_reservation(refused: list[openai.APIStatusError], limit: str) -> None:
    for exc in refused:
        assert exc.status_code == 429
        assert isinstance(exc.body, dict)
        assert exc.body["code"] == reserve.REFUSAL
        assert exc.response.headers["x-costwarden-reservation-limit"] == limit
        assert "max_tokens lower" in exc.body["message"]


def test_100_concurrent_calls_at_the_team_cap_never_overspend(
    fake: FakeUpstream, upstream: ServerThread, credentials: Path
) -> None:
    left = room(MINI, 30.5)  # 30 worst cases fit, not 31
    spent = HARD_CAP - left
    gateway = start(config(upstream.url, spent=spent), credentials)
    try:
        first = fire(gateway, 0)
        records = settled_records(gateway, CALLS)
        assert gateway.gateway.reservations.in_flight == 0

        assert first.ok == len(fake.calls) >= 30
        assert len(first.refused) == CALLS - first.ok > 0
        assert_refused_for_reservation(first.refused, "team_cap")
        upstream_bill = billed(fake, MINI)
        assert sum((r.cost_usd for r in records), Decimal(0)) == upstream_bill
        assert spent + upstream_bill <= HARD_CAP
        refusals = [r for r in records if r.outcome is Outcome.REFUSED]
        assert all(r.reason == reserve.REFUSAL and r.cost_usd == 0 for r in refusals)

        # Keep going until nothing fits: what is left then is less than one worst case.
        for wave in range(1, 5):
            if fire(gateway, wave * CALLS).ok == 0:
                break
        settled_records(gateway, len(gateway.sink.records))  # type: ignore[attr-defined]
        upstream_bill = billed(fake, MINI)
        assert spent + upstream_bill <= HARD_CAP
        assert HARD_CAP - spent - upstream_bill < worst(MINI)
    finally:
        gateway.stop()


def test_the_same_load_without_reservation_overspends(
    fake: FakeUpstream, upstream: ServerThread, credentials: Path
) -> None:
    """The control: admission by settled spend alone lets all 100 through."""
    spent = HARD_CAP - room(MINI, 30.5)
    gateway = start(config(upstream.url, spent=spent), credentials, reserving=False)
    try:
        outcomes = fire(gateway, 0)
        settled_records(gateway, CALLS)
    finally:
        gateway.stop()
    assert outcomes.ok == CALLS
    assert spent + billed(fake, MINI) > HARD_CAP


def test_model_caps_hold_under_the_same_load(
    fake: FakeUpstream, upstream: ServerThread, credentials: Path
) -> None:
    cap = room(BIG, 20.5)
    gateway = start(
        config(upstream.url, model_caps=[ModelCap(model="big", max_cost_usd=cap)]), credentials
    )
    try:
        outcomes = fire(gateway, 0, headers={"X-Costwarden-Task": "big"})
        records = settled_records(gateway, CALLS)
        # Calls not routed to "big" do not count against its cap.
        assert fire(gateway, CALLS).ok == CALLS
    finally:
        gateway.stop()
    assert outcomes.ok >= 20
    assert_refused_for_reservation(outcomes.refused, "model_cost")
    big_bill = sum((r.cost_usd for r in records if r.served_model == "big"), Decimal(0))
    assert big_bill == billed_first(fake, outcomes.ok, BIG)
    assert big_bill <= cap


def billed_first(fake: FakeUpstream, calls: int, pricing: ModelPricing) -> Decimal:
    first = FakeUpstream(calls=fake.calls[:calls])
    return billed(first, pricing)


def test_per_job_caps_hold_under_the_same_load(
    fake: FakeUpstream, upstream: ServerThread, credentials: Path
) -> None:
    cap = room(MINI, 10.5)
    gateway = start(config(upstream.url, per_job=PerJobLimits(max_cost_usd=cap)), credentials)
    try:
        outcomes = fire(gateway, 0)
        settled_records(gateway, CALLS)
    finally:
        gateway.stop()
    assert outcomes.ok >= 10
    assert_refused_for_reservation(outcomes.refused, "job_cost")
    assert billed(fake, MINI) <= cap


def test_a_stream_without_usage_is_charged_its_reservation(
    fake: FakeUpstream, upstream: ServerThread, credentials: Path
) -> None:
    gateway = start(config(upstream.url, mini="gpt-4o-mini"), credentials)
    try:
        fake.script("gpt-4o-mini", "no-usage")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)
        # The gateway withholds the upstream's [DONE] and ends the stream with its own
        # error event, which the SDK raises, saying how the call is charged.
        with pytest.raises(openai.APIError, match="charged its reservation"):
            for _ in client.chat.completions.create(**body(0), stream=True):
                pass
        record = settled_records(gateway, 1)[0]
        settlements = gateway.gateway.metrics.settlements.labels(TEAM_ID, "reservation")
        assert settlements._value.get() == 1
    finally:
        gateway.stop()
    prompt = reserve.prompt_token_bound(orjson.dumps(body(0) | {"stream": True}))
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    assert "charged_reservation" in record.reason
    assert (record.tokens.input, record.tokens.output) == (prompt, MAX_TOKENS)
    resolved = model("x", "http://x", upstream_model="x", pricing=MINI).pricing
    assert record.cost_usd == reserve.worst_cost(prompt, MAX_TOKENS, resolved) > 0
