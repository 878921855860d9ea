"""Records for the store's tests: built as the gateway builds them, priced exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

from costwarden.api.accounting import TokenUsage
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.store.schema import Pricing

GPT = Pricing(Decimal("2"), Decimal("8"), Decimal("0.5"), Decimal("2"), Decimal("10"))
"""gpt-4.1 list prices per 1M tokens, with a 10 % contract discount."""
CLAUDE = Pricing(Decimal("3"), Decimal("15"), Decimal("0.3"), Decimal("3.75"))


def cost_of(p: Pricing, inp: int, out: int, cached: int = 0, creation: int = 0) -> Decimal:
    return (
        inp * p.input + out * p.output + cached * p.cached_input + creation * p.cache_write
    ) / Decimal(1_000_000)


def make_record(
    *,
    when: datetime = datetime(2026, 11, 3, 12, 0, tzinfo=UTC),
    team: str = "team-a/a",
    job: str = "job-1",
    model: str = "gpt-4.1",
    provider: str = "OpenAI",
    pricing: Pricing | None = GPT,
    inp: int = 1000,
    out: int = 100,
    cached: int = 0,
    creation: int = 0,
    outcome: Outcome = Outcome.OK,
    reason: str = "",
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> UsageRecord:
    reported = outcome in (Outcome.OK, Outcome.CLIENT_DISCONNECTED)
    cost = cost_of(pricing, inp, out, cached, creation) if (pricing and reported) else Decimal(0)
    return UsageRecord(
        time=when, team=team, namespace=team.split("/")[0], job=job, pod=f"{job}-pod",
        endpoint=Endpoint.CHAT_COMPLETIONS, requested_model=model, served_model=model,
        upstream_model=model, provider=provider, rule="default", outcome=outcome,
        reason=reason, usage_reported=reported,
        tokens=TokenUsage(input=inp, output=out, cached_input=cached, cache_creation=creation)
        if reported else TokenUsage(),
        cost_usd=cost, labels=labels or {}, **extra,
    )  # fmt: skip
