"""Which Jobs enforcement stops or resumes (pure: Job bodies in, decisions out).

A Job belongs to a team when it is in one of the budget's *governed* namespaces
(policy.tenancy: its own, and those whose Namespace consents) and matches its selector;
a namespace the budget merely claims is never touched. Only the budget can exempt a Job
(``spec.exemptions``): no label or annotation a Job sets on itself keeps it running,
because the team writing the Job is the party the budget constrains.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from costwarden.accounting.books import JobEntry
from costwarden.api.conditions import Reason
from costwarden.api.teambudget import Exemptions, PerJobLimits, TeamBudgetSpec
from costwarden.enforcement.workload import (
    STOPPED_AT_ANNOTATION,
    SUSPENDED_BY_LABEL,
    SUSPENDED_FOR_LABEL,
    ResumeReason,
    StopReason,
)

Job = Mapping[str, Any]


def _meta(job: Job) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = job.get("metadata") or {}
    return meta


def labels_of(job: Job) -> dict[str, str]:
    return dict(_meta(job).get("labels") or {})


def is_finished(job: Job) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
    )


def is_suspended(job: Job) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def belongs_to_team(job: Job, spec: TeamBudgetSpec, governed: Collection[str]) -> bool:
    """Whether the Job is in a governed namespace and matches the budget's selector."""
    if _meta(job).get("namespace") not in governed:
        return False
    selector = spec.workloads.selector
    return selector is None or selector.matches(labels_of(job))


def is_exempt(job: Job, exemptions: Exemptions | None) -> bool:
    if exemptions is None:
        return False
    if _meta(job).get("name") in exemptions.job_names:
        return True
    selector = exemptions.job_selector
    return (
        selector is not None
        and bool(selector.match_labels or selector.match_expressions)
        and (selector.matches(labels_of(job)))
    )


def jobs_to_stop(jobs: Iterable[Job], spec: TeamBudgetSpec, governed: Collection[str]) -> list[Job]:
    """The team's running Jobs (not suspended, not finished) in its governed namespaces,
    minus the budget's exemptions."""
    return [
        job
        for job in jobs
        if belongs_to_team(job, spec, governed)
        and not is_suspended(job)
        and not is_finished(job)
        and not is_exempt(job, spec.exemptions)
    ]


def stop_reason(cap_reason: str) -> StopReason:
    """The stop reason for the condition reason of an Exhausted verdict."""
    if cap_reason == Reason.TOKEN_CAP_EXCEEDED:
        return StopReason.TOKEN_CAP_REACHED
    return StopReason.HARD_CAP_REACHED


@dataclass(frozen=True, slots=True)
class BudgetStanding:
    """What resume decisions need to know of a budget."""

    uid: str
    exhausted: bool
    period_start: datetime | None


def jobs_to_resume(
    suspended: Iterable[Job], budgets: Mapping[str, BudgetStanding]
) -> list[tuple[Job, ResumeReason]]:
    """Jobs suspended for a team's cap whose budget is no longer over it, with the reason.

    Jobs suspended for their own loop or per-job cap (``suspended-for: job``) are left
    alone: raising the team's cap does not cure a loop.
    """
    decisions = []
    for job in suspended:
        labels = labels_of(job)
        if labels.get(SUSPENDED_FOR_LABEL) != "cap" or not is_suspended(job):
            continue
        standing = budgets.get(labels.get(SUSPENDED_BY_LABEL, ""))
        if standing is None:
            decisions.append((job, ResumeReason.BUDGET_DELETED))
        elif not standing.exhausted:
            decisions.append((job, _resume_reason(job, standing)))
    return decisions


def _resume_reason(job: Job, standing: BudgetStanding) -> ResumeReason:
    stopped = str((_meta(job).get("annotations") or {}).get(STOPPED_AT_ANNOTATION, ""))
    try:
        stopped_at = datetime.fromisoformat(stopped.replace("Z", "+00:00"))
    except ValueError:
        return ResumeReason.CAP_RAISED
    if standing.period_start is not None and stopped_at < standing.period_start:
        return ResumeReason.PERIOD_ROLLED_OVER
    return ResumeReason.CAP_RAISED


def over_job_cap(entry: JobEntry, per_job: PerJobLimits | None) -> str | None:
    """A sentence if a Job's spend in the period reached its per-job cap, else None."""
    if per_job is None or entry.outcome is not None:
        return None
    spend = entry.spend
    if per_job.max_cost_usd is not None and spend.usd >= per_job.max_cost_usd:
        return (
            f"spent {_usd(spend.usd)} USD of its {_usd(per_job.max_cost_usd)} USD perJob.maxCostUSD"
        )
    if per_job.max_tokens is not None and spend.tokens >= per_job.max_tokens:
        return f"used {spend.tokens} tokens of its {per_job.max_tokens} perJob.maxTokens"
    return None


def _usd(amount: Decimal) -> str:
    return format(amount.quantize(Decimal("0.000001")), "f")


def suspend_patch(
    *, budget_uid: str, budget_id: str, reason: StopReason, at: str, message: str
) -> dict[str, Any]:
    """One merge patch that suspends a Job and says why, so the reason is never lost."""
    return {
        "metadata": {
            "labels": {SUSPENDED_BY_LABEL: budget_uid, SUSPENDED_FOR_LABEL: reason.suspended_for},
            "annotations": {
                "costwarden.io/stopped-by": budget_id,
                "costwarden.io/stopped-reason": reason.value,
                STOPPED_AT_ANNOTATION: at,
                "costwarden.io/stopped-message": message[:1024],
            },
        },
        "spec": {"suspend": True},
    }


def resume_patch(reason: ResumeReason, at: str) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {SUSPENDED_BY_LABEL: None, SUSPENDED_FOR_LABEL: None},
            "annotations": {
                "costwarden.io/resumed-at": at,
                "costwarden.io/resumed-reason": reason.value,
            },
        },
        "spec": {"suspend": False},
    }
