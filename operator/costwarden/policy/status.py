"""What to write into an object's status for a verdict: pure, so it is tested without a cluster.

Each function returns the status fragment to merge-patch, or None when the object's status
already says all of it, so a steady cluster costs no writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from costwarden.accounting.held import HeldSummary
from costwarden.accounting.periods import rollover_fragment
from costwarden.api.conditions import ConditionType, Reason, find_condition, set_condition
from costwarden.api.meta import Condition, ConditionStatus
from costwarden.api.money import format_money
from costwarden.api.teambudget import MAX_PERCENT, BudgetPhase
from costwarden.policy.render import BudgetVerdict, PolicyVerdict, Verdict, observed_spend


def _conditions(status: Mapping[str, Any]) -> list[Condition]:
    try:
        return [Condition.model_validate(c) for c in status.get("conditions") or []]
    except ValidationError:
        return []  # a hand-edited, broken list is replaced rather than kept


def _with_ready(
    verdict: Verdict, observed: Mapping[str, Any], generation: int, now: datetime
) -> list[Condition]:
    """The observed conditions with Ready set from the verdict (both kinds have it)."""
    return set_condition(
        _conditions(observed),
        type=ConditionType.READY,
        status=ConditionStatus.TRUE if verdict.ready else ConditionStatus.FALSE,
        reason=verdict.reason,
        message=verdict.message,
        now=now,
        observed_generation=generation,
    )


def budget_status(
    verdict: BudgetVerdict,
    observed: Mapping[str, Any],
    generation: int,
    hard_cap_usd: Decimal | None,
    now: datetime,
    held: HeldSummary | None = None,
) -> dict[str, Any]:
    """The full status fields the reconciler owns for a TeamBudget; ``held``: the team's
    held usage as ingestion knows it (None: unknown here, UsageApplied left as it is)."""
    conditions = usage_applied(
        _with_ready(verdict, observed, generation, now), held, generation, now
    )
    fragment: dict[str, Any] = {"observedGeneration": generation}
    # A budget restricted by tenancy (Ready=False, NamespaceNotGranted/ReferenceNotGranted)
    # still has caps: it keeps its phase, so its spend and enforcement stay visible.
    if verdict.caps is None or hard_cap_usd is None:
        fragment["phase"] = BudgetPhase.INVALID.value
        fragment["conditions"] = _dump(conditions)
        return fragment
    caps = verdict.caps
    assert verdict.period_start is not None
    assert verdict.period_end is not None
    # Past the hard cap the soft limit is still passed, for the same reason as before: its
    # reason stays SoftLimitExceeded, so crossing the cap is one Event, not two.
    for ctype, reached, reason in (
        (
            ConditionType.SOFT_LIMIT_REACHED,
            caps.phase is not BudgetPhase.ACTIVE,
            Reason.SOFT_LIMIT_EXCEEDED,
        ),
        (ConditionType.HARD_CAP_REACHED, caps.phase is BudgetPhase.EXHAUSTED, caps.reason),
    ):
        conditions = set_condition(
            conditions,
            type=ctype,
            status=ConditionStatus.TRUE if reached else ConditionStatus.FALSE,
            reason=reason if reached else Reason.WITHIN_LIMIT,
            message=caps.message,
            now=now,
            observed_generation=generation,
        )
    spent, _ = observed_spend(observed, verdict.period_start)
    fragment.update(
        {
            "phase": caps.phase.value,
            "conditions": _dump(conditions),
            "remainingUSD": format_money(max(hard_cap_usd - spent, Decimal(0))),
            "usedPercent": _percent(spent, hard_cap_usd),
        }
    )
    # spentUSD, tokens, currentPeriod and the rest of the books belong to the accounting;
    # the reconciler only opens a new period (or the first one) when it is due, with the
    # accounting's own idempotent rollover, so a budget without traffic rolls over too.
    fragment.update(rollover_fragment(observed, verdict.period_start, verdict.period_end))
    return fragment


def usage_applied(
    conditions: list[Condition], held: HeldSummary | None, generation: int, now: datetime
) -> list[Condition]:
    """``UsageApplied``: False (UsageHeld) while entries of the team are held, True
    (UsageApplied) once they applied; absent until the first hold, so a budget whose usage
    was never held carries no such condition."""
    if held is None:
        return conditions
    if held.entries:
        gateways = "a gateway" if held.sources == 1 else f"{held.sources} gateways"
        return set_condition(
            conditions,
            type=ConditionType.USAGE_APPLIED,
            status=ConditionStatus.FALSE,
            reason=Reason.USAGE_HELD,
            message=(
                f"{held.entries} usage entries from {gateways} could not be written to this "
                f"status and are held (kept by the gateway and re-sent until they apply; "
                f"spend shown lags until then) ({held.reason}): {held.message}"
            )[:1024],
            now=now,
            observed_generation=generation,
        )
    if find_condition(conditions, ConditionType.USAGE_APPLIED) is None:
        return conditions
    return set_condition(
        conditions,
        type=ConditionType.USAGE_APPLIED,
        status=ConditionStatus.TRUE,
        reason=Reason.USAGE_APPLIED,
        message="the usage entries once held have been applied",
        now=now,
        observed_generation=generation,
    )


def policy_status(
    verdict: PolicyVerdict, observed: Mapping[str, Any], generation: int, now: datetime
) -> dict[str, Any]:
    conditions = _with_ready(verdict, observed, generation, now)
    return {
        "observedGeneration": generation,
        "models": verdict.models,
        "teams": verdict.teams,
        "conditions": _dump(conditions),
    }


def changed_fields(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``desired`` that differs from ``observed`` (empty: nothing to write)."""
    return {k: v for k, v in desired.items() if observed.get(k) != v}


def _percent(spent: Decimal, cap: Decimal) -> int:
    if cap <= 0:
        return 100
    if spent * 100 >= cap * MAX_PERCENT:
        return MAX_PERCENT  # the schema's bound (and no quotient beyond Decimal's 28 digits)
    return int(spent * 100 // cap)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [
        {
            **c.to_wire(),
            "lastTransitionTime": _timestamp(c.last_transition_time),
        }
        for c in conditions
    ]
