"""The reservation arithmetic (policy/reservation.py): worst cases and what fits, exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from costwarden.api.gatewayconfig import ResolvedPricing, SpendState, TeamConfig
from costwarden.api.teambudget import (
    HardCapEnforcement,
    ModelCap,
    Period,
    PerJobLimits,
    RequestAction,
    TokenCaps,
    TokenUsage,
)
from costwarden.api.usage import Endpoint
from costwarden.policy import reservation as r
from costwarden.testing.gateway import model

PRICING = ResolvedPricing(
    input_per_m_tok_usd=Decimal("2.50"),
    output_per_m_tok_usd=Decimal("10.00"),
    cached_input_per_m_tok_usd=Decimal("1.25"),
    cache_write_per_m_tok_usd=Decimal("3.00"),
)


def team(**overrides: Any) -> TeamConfig:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": "team-a/budget",
        "namespaces": ["team-a"],
        "period": Period(),
        "hard_cap_usd": Decimal(10),
        "soft_limit_usd": Decimal(8),
        "spend": SpendState(period_start=now - timedelta(days=1), period_end=now),
    }
    values.update(overrides)
    return TeamConfig(**values)


def test_prompt_bound_is_the_body_size_plus_an_allowance_per_image() -> None:
    text = orjson.dumps({"messages": [{"role": "user", "content": "héllo wörld"}]})
    assert r.prompt_token_bound(text) == len(text)
    image = orjson.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                        {"type": "input_image", "image_url": "https://x/b.png"},
                    ],
                }
            ]
        }
    )
    assert r.prompt_token_bound(image) == len(image) + 2 * r.IMAGE_TOKENS


def test_prompt_bound_is_never_below_what_a_byte_level_tokenizer_counts() -> None:
    # Byte-level BPE emits at most one token per byte of text: the bound holds for any text.
    text = "naïve café — 東京 🙂 " * 50
    body = orjson.dumps({"messages": [{"role": "user", "content": text}]})
    assert r.prompt_token_bound(body) >= len(text.encode())


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        (Endpoint.CHAT_COMPLETIONS, {"max_tokens": 100}, (100, False)),
        (Endpoint.CHAT_COMPLETIONS, {"max_completion_tokens": 300}, (300, False)),
        (Endpoint.CHAT_COMPLETIONS, {"max_tokens": 50, "max_completion_tokens": 70}, (70, False)),
        (Endpoint.CHAT_COMPLETIONS, {"max_tokens": 10, "n": 3}, (30, False)),
        (Endpoint.CHAT_COMPLETIONS, {}, (r.DEFAULT_MAX_OUTPUT_TOKENS, True)),
        (Endpoint.CHAT_COMPLETIONS, {"max_tokens": 0}, (r.DEFAULT_MAX_OUTPUT_TOKENS, True)),
        (Endpoint.CHAT_COMPLETIONS, {"max_tokens": True}, (r.DEFAULT_MAX_OUTPUT_TOKENS, True)),
        (Endpoint.RESPONSES, {"max_output_tokens": 64}, (64, False)),
        (Endpoint.RESPONSES, {"max_tokens": 64}, (r.DEFAULT_MAX_OUTPUT_TOKENS, True)),
        (Endpoint.MESSAGES, {"max_tokens": 1024}, (1024, False)),
        (Endpoint.EMBEDDINGS, {"max_tokens": 1024}, (0, False)),
    ],
)
def test_output_ceiling(
    endpoint: Endpoint, body: dict[str, Any], expected: tuple[int, bool]
) -> None:
    assert r.output_ceiling(body, endpoint, None) == expected


def test_output_ceiling_uses_the_policy_default() -> None:
    assert r.output_ceiling({}, Endpoint.CHAT_COMPLETIONS, 512) == (512, True)
    assert r.output_ceiling({"n": 2}, Endpoint.CHAT_COMPLETIONS, 512) == (1024, True)


def test_worst_cost_prices_input_at_the_dearest_input_rate() -> None:
    # 1,000 input at max(2.50, 1.25, 3.00) + 500 output at 10.00, per 1M.
    assert r.worst_cost(1000, 500, PRICING) == Decimal("0.008")


def test_worst_case_takes_the_dearest_candidate() -> None:
    cheap, dear = model("gpt-4o-mini", "http://x"), model("gpt-4o", "http://x")
    worst = r.worst_case(1000, 1000, (cheap, dear))
    assert worst.cost == r.worst_cost(1000, 1000, dear.pricing)
    assert worst.cost > r.worst_cost(1000, 1000, cheap.pricing)
    assert r.worst_case(10, 10, ()).cost == 0


def test_team_cap_fits_exactly_at_what_is_left() -> None:
    worst = r.WorstCase(1000, 500, Decimal("0.008"))
    left = r.Standing(spent=Decimal("9.99"), reserved=Decimal("0.002"))
    assert r.team_shortfall(team(), worst, left, None, 0, 0, False) is None
    one_more = r.Standing(spent=Decimal("9.99"), reserved=Decimal("0.0020001"))
    short = r.team_shortfall(team(), worst, one_more, None, 0, 0, False)
    assert short is not None
    assert short.limit == "team_cap"
    assert not short.final  # it fits once the calls in flight settle
    assert "0.008" in short.message
    assert "max_tokens lower" in short.message


def test_team_cap_refusal_is_final_when_nothing_in_flight_could_help() -> None:
    worst = r.WorstCase(1000, 500, Decimal("0.02"))
    short = r.team_shortfall(team(), worst, r.Standing(spent=Decimal("9.99")), None, 0, 0, True)
    assert short is not None
    assert short.final
    assert "policy default" in short.message


def test_team_cap_with_allow_never_refuses() -> None:
    allow = team(on_hard_cap=HardCapEnforcement(requests=RequestAction.ALLOW))
    worst = r.WorstCase(1, 1, Decimal(100))
    assert r.team_shortfall(allow, worst, r.Standing(), None, 0, 0, False) is None


def test_token_caps_count_settled_and_reserved_tokens() -> None:
    capped = team(token_caps=TokenCaps(input=1000, output=100, total=1050))
    used = TokenUsage(input=500, cached_input=100, cache_creation=100, output=0)
    worst = r.WorstCase(200, 50, Decimal(0))
    assert r.team_shortfall(capped, worst, r.Standing(), used, 100, 0, False) is None
    short = r.team_shortfall(capped, worst, r.Standing(), used, 101, 0, False)
    assert short is not None
    assert short.limit == "team_tokens"
    assert "input-token" in short.message
    short = r.team_shortfall(
        capped, r.WorstCase(200, 101, Decimal(0)), r.Standing(), used, 0, 0, False
    )
    assert short is not None
    assert "output-token" in short.message
    inputs_only = r.WorstCase(200, 0, Decimal(0))
    short = r.team_shortfall(capped, inputs_only, r.Standing(), used, 100, 60, False)
    assert short is not None
    assert "total-token" in short.message


def test_job_caps() -> None:
    capped = team(per_job=PerJobLimits(max_cost_usd=Decimal(1), max_tokens=2000))
    worst = r.WorstCase(1000, 500, Decimal("0.5"))
    fits = r.Standing(
        spent=Decimal("0.25"), reserved=Decimal("0.25"), tokens=200, reserved_tokens=300
    )
    assert r.job_shortfall(capped, "job-1", worst, fits, False) is None
    over = r.Standing(spent=Decimal("0.25"), reserved=Decimal("0.26"))
    short = r.job_shortfall(capped, "job-1", worst, over, False)
    assert short is not None
    assert short.limit == "job_cost"
    assert "job-1" in short.message
    many = r.Standing(tokens=200, reserved_tokens=301)
    short = r.job_shortfall(capped, "job-1", worst, many, False)
    assert short is not None
    assert short.limit == "job_tokens"
    assert r.job_shortfall(team(), "job-1", worst, over, False) is None


def test_model_caps_price_the_call_at_that_model() -> None:
    dear = model("gpt-4o", "http://x")
    capped = team(model_caps=[ModelCap(model="gpt-4o", max_cost_usd=Decimal("0.02"))])
    worst = r.WorstCase(1000, 1000, Decimal(1))  # the dearest candidate's figure: not used
    own = r.worst_cost(1000, 1000, dear.pricing)  # 0.0125
    assert (
        r.model_shortfall(capped, dear, worst, r.Standing(spent=Decimal("0.0075")), False) is None
    )
    short = r.model_shortfall(
        capped, dear, worst, r.Standing(spent=Decimal("0.0075"), reserved=Decimal("1e-7")), False
    )
    assert short is not None
    assert short.limit == "model_cost"
    assert str(own) in short.message
    other = model("gpt-4o-mini", "http://x")
    assert r.model_shortfall(capped, other, worst, r.Standing(spent=Decimal(5)), False) is None


def test_model_token_caps() -> None:
    route = model("gpt-4o", "http://x")
    capped = team(model_caps=[ModelCap(model="gpt-4o", max_tokens=1000)])
    worst = r.WorstCase(400, 100, Decimal(0))
    assert r.model_shortfall(capped, route, worst, r.Standing(tokens=500), False) is None
    short = r.model_shortfall(
        capped, route, worst, r.Standing(tokens=500, reserved_tokens=1), False
    )
    assert short is not None
    assert short.limit == "model_tokens"


def test_charged_tokens_are_the_reservation() -> None:
    tokens = r.charged_tokens(r.WorstCase(123, 456, Decimal(1)))
    assert (tokens.input, tokens.output, tokens.cached_input, tokens.cache_creation) == (
        123,
        456,
        0,
        0,
    )
