"""Whether a team's budget is within its limits: the one place a cap is decided.

The gateway asks before every call (with the spend it knows), the operator after every
accounting update; both get the same answer from the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from costwarden.api.conditions import Reason
from costwarden.api.money import MICRO, format_money
from costwarden.api.teambudget import BudgetPhase, TokenCaps, TokenUsage
from costwarden.api.usage import format_exact_usd


@dataclass(frozen=True)
class CapVerdict:
    """The phase a budget is in, and which limit put it there (for messages and Events)."""

    phase: BudgetPhase
    reason: Reason
    message: str

    @property
    def over_hard_cap(self) -> bool:
        return self.phase is BudgetPhase.EXHAUSTED


def evaluate_caps(
    *,
    spent_usd: Decimal,
    tokens: TokenUsage,
    hard_cap_usd: Decimal,
    soft_limit_usd: Decimal,
    token_caps: TokenCaps | None,
    refused_need_usd: Decimal | None = None,
) -> CapVerdict:
    """The budget's phase for this spend. A hard cap is reached at equality: the cap is
    the most a team may spend, and a call that lands exactly on it leaves nothing to spend.

    With reservation, spend stops short of the cap: calls whose worst case does not fit
    are refused. ``refused_need_usd`` is the smallest such worst case of the period (at the
    default output ceiling, policy/leases.py); while it still does not fit, the cap is
    reached as surely as if the spend had hit it, and enforcement acts on it."""
    if spent_usd >= hard_cap_usd:
        return CapVerdict(
            BudgetPhase.EXHAUSTED,
            Reason.HARD_CAP_EXCEEDED,
            f"spent {format_money(spent_usd)} USD of the {format_money(hard_cap_usd)} USD hard cap",
        )
    if refused_need_usd is not None and _no_room(spent_usd, refused_need_usd, hard_cap_usd):
        return CapVerdict(
            BudgetPhase.EXHAUSTED,
            Reason.CALL_EXCEEDS_REMAINING,
            f"spent {format_money(spent_usd)} USD of the {format_money(hard_cap_usd)} USD hard "
            f"cap; a call needing {format_exact_usd(refused_need_usd)} USD at the default output "
            "ceiling was refused: what is left cannot hold one",
        )
    tripped = tripped_token_cap(tokens, token_caps)
    if tripped:
        return CapVerdict(BudgetPhase.EXHAUSTED, Reason.TOKEN_CAP_EXCEEDED, tripped)
    if spent_usd >= soft_limit_usd:
        return CapVerdict(
            BudgetPhase.SOFT_LIMITED,
            Reason.SOFT_LIMIT_EXCEEDED,
            f"spent {format_money(spent_usd)} USD, past the "
            f"{format_money(soft_limit_usd)} USD soft limit",
        )
    return CapVerdict(
        BudgetPhase.ACTIVE,
        Reason.WITHIN_LIMIT,
        f"spent {format_money(spent_usd)} USD of {format_money(hard_cap_usd)} USD",
    )


def _no_room(spent: Decimal, need: Decimal, cap: Decimal) -> bool:
    """Whether ``need`` no longer fits ``cap - spent``, at micro-dollar resolution: spend
    rounded down (as status.spentUSD and the gateway configuration carry it), the need
    rounded up. The reconciler reads the rounded spend and the accounting the exact one;
    both must agree, and both agree on the rounded figures (a cap has six decimals)."""
    rounded = spent.quantize(MICRO, rounding=ROUND_FLOOR)
    return rounded + need.quantize(MICRO, rounding=ROUND_CEILING) >= cap


def tripped_token_cap(tokens: TokenUsage, caps: TokenCaps | None) -> str | None:
    """A sentence naming the first token cap reached, or None."""
    if caps is None:
        return None
    # Cached and cache-write tokens are input tokens too: a cap on input counts them all.
    all_input = tokens.prompt()
    checks = (
        ("input", all_input, caps.input),
        ("output", tokens.output, caps.output),
        ("total", all_input + tokens.output, caps.total),
    )
    for kind, used, cap in checks:
        if cap is not None and used >= cap:
            return f"used {used} {kind} tokens of the {cap} {kind}-token cap"
    return None
