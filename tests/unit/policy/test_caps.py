from decimal import Decimal

from costwarden.api.teambudget import BudgetPhase, TokenCaps, TokenUsage
from costwarden.policy.caps import evaluate_caps


def verdict(spent: str, tokens: TokenUsage | None = None, caps: TokenCaps | None = None):
    return evaluate_caps(
        spent_usd=Decimal(spent),
        tokens=tokens or TokenUsage(),
        hard_cap_usd=Decimal(100),
        soft_limit_usd=Decimal(80),
        token_caps=caps,
    )


def test_below_soft_limit_is_active():
    assert verdict("79.999999").phase is BudgetPhase.ACTIVE


def test_at_soft_limit_is_soft_limited():
    result = verdict("80")
    assert result.phase is BudgetPhase.SOFT_LIMITED
    assert result.reason == "SoftLimitExceeded"


def test_landing_exactly_on_the_hard_cap_exhausts():
    result = verdict("100.00")
    assert result.over_hard_cap
    assert result.message == "spent 100.00 USD of the 100.00 USD hard cap"


def test_a_token_cap_counts_cached_input_as_input():
    result = verdict("1", TokenUsage(input=10, cached_input=90), TokenCaps(input=100))
    assert result.phase is BudgetPhase.EXHAUSTED
    assert result.reason == "TokenCapExceeded"
    assert "100 input tokens" in result.message


def test_total_token_cap():
    assert verdict("1", TokenUsage(input=5, output=4), TokenCaps(total=10)).phase is (
        BudgetPhase.ACTIVE
    )
    assert verdict("1", TokenUsage(input=5, output=5), TokenCaps(total=10)).over_hard_cap
