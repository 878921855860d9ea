"""Whether one more call may go ahead: hard cap, per-job caps and per-job rate (pure).

The gateway keeps the counters (gateway/limits.py); these functions only decide, with the
clock passed in. Every refusal names the budget and the limit, and its ``code`` is the
machine-readable reason clients see in the error body.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from costwarden.api.conditions import Reason
from costwarden.api.gatewayconfig import TeamConfig
from costwarden.api.teambudget import BudgetPhase, PerJobLimits, RequestAction, TokenUsage
from costwarden.api.usage import RefusalReason
from costwarden.policy.caps import CapVerdict, evaluate_caps

RATE_WINDOW_SECONDS = 60.0
_PHASE_ORDER = {BudgetPhase.ACTIVE: 0, BudgetPhase.SOFT_LIMITED: 1, BudgetPhase.EXHAUSTED: 2}


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    code: RefusalReason
    message: str


def team_verdict(team: TeamConfig, extra_cost: Decimal, extra_tokens: TokenUsage) -> CapVerdict:
    """The team's phase: the operator's spend snapshot plus what this gateway has seen since.

    The operator's own phase wins when it is further along (it sees every replica).
    """
    spend = team.spend
    tokens = TokenUsage.model_construct(  # sums of validated counts (hot path: no re-check)
        input=spend.tokens.input + extra_tokens.input,
        output=spend.tokens.output + extra_tokens.output,
        cached_input=spend.tokens.cached_input + extra_tokens.cached_input,
        cache_creation=spend.tokens.cache_creation + extra_tokens.cache_creation,
        cache_creation_1h=spend.tokens.cache_creation_1h + extra_tokens.cache_creation_1h,
    )
    verdict = evaluate_caps(
        spent_usd=spend.spent_usd + extra_cost,
        tokens=tokens,
        hard_cap_usd=team.hard_cap_usd,
        soft_limit_usd=team.soft_limit_usd,
        token_caps=team.token_caps,
    )
    if _PHASE_ORDER.get(spend.phase, 0) > _PHASE_ORDER[verdict.phase]:
        return CapVerdict(spend.phase, verdict.reason, f"the operator reports {spend.phase.value}")
    return verdict


def phase_order(phase: BudgetPhase) -> int:
    """Active < SoftLimited < Exhausted."""
    return _PHASE_ORDER.get(phase, 0)


def operator_exhausted_verdict() -> CapVerdict:
    """The operator, which sums every replica's usage, reported the team Exhausted."""
    return CapVerdict(
        BudgetPhase.EXHAUSTED,
        Reason.HARD_CAP_EXCEEDED,
        "the operator reports the hard cap reached (usage of every gateway replica)",
    )


def hard_cap_refusal(team: TeamConfig, verdict: CapVerdict) -> LimitRefusal | None:
    if not verdict.over_hard_cap or team.on_hard_cap.requests is RequestAction.ALLOW:
        return None
    return LimitRefusal(
        RefusalReason.HARD_CAP,
        f"TeamBudget {team.id} is over its hard cap ({verdict.message}); new calls are "
        "refused until the period resets or the cap is raised (onHardCap.requests: Block)",
    )


def job_cap_refusal(
    team: TeamConfig, job: str, per_job: PerJobLimits | None, cost: Decimal, tokens: int
) -> LimitRefusal | None:
    if per_job is None:
        return None
    if per_job.max_cost_usd is not None and cost >= per_job.max_cost_usd:
        return LimitRefusal(
            RefusalReason.JOB_COST_CAP,
            f"job {job} has spent {cost:f} USD of the {per_job.max_cost_usd:f} USD "
            f"perJob.maxCostUSD of TeamBudget {team.id}",
        )
    if per_job.max_tokens is not None and tokens >= per_job.max_tokens:
        return LimitRefusal(
            RefusalReason.JOB_TOKEN_CAP,
            f"job {job} has used {tokens} tokens of the {per_job.max_tokens} "
            f"perJob.maxTokens of TeamBudget {team.id}",
        )
    return None


def rate_refusal(
    team: TeamConfig, job: str, times: deque[float], limit: int | None, now: float
) -> LimitRefusal | None:
    """Sliding window: at most ``limit`` admitted calls in any 60 s; admits record ``now``."""
    if limit is None:
        return None
    horizon = now - RATE_WINDOW_SECONDS
    while times and times[0] <= horizon:
        times.popleft()
    if len(times) >= limit:
        retry = times[0] + RATE_WINDOW_SECONDS - now
        return LimitRefusal(
            RefusalReason.RATE_LIMITED,
            f"job {job} reached perJob.maxRequestsPerMinute={limit} of TeamBudget {team.id}; "
            f"retry in {retry:.1f} s",
        )
    times.append(now)
    return None
