"""What enforcement can stop: a small protocol, as Kueue's ``GenericJob`` (Job today;
JobSet, Argo Workflows or RayJob would be further adapters), and why it stops them.

The marks enforcement leaves on a workload are part of the API users see:

- label ``costwarden.io/suspended-by: <TeamBudget uid>``, so the Jobs a budget suspended
  are found again with one label selector, and ``costwarden.io/suspended-for`` (``cap`` or
  ``job``), so only the Jobs suspended for the team's cap are resumed when the cap is
  raised or the period rolls over, never those stopped for their own loop or cap;
- annotations ``costwarden.io/stopped-by`` (namespace/name of the budget),
  ``stopped-reason`` (a :class:`StopReason`), ``stopped-at`` (RFC 3339) and
  ``stopped-message``; on resume ``resumed-at`` and ``resumed-reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

SUSPENDED_BY_LABEL = "costwarden.io/suspended-by"
SUSPENDED_FOR_LABEL = "costwarden.io/suspended-for"
STOPPED_BY_ANNOTATION = "costwarden.io/stopped-by"
STOPPED_REASON_ANNOTATION = "costwarden.io/stopped-reason"
STOPPED_AT_ANNOTATION = "costwarden.io/stopped-at"
STOPPED_MESSAGE_ANNOTATION = "costwarden.io/stopped-message"
RESUMED_AT_ANNOTATION = "costwarden.io/resumed-at"
RESUMED_REASON_ANNOTATION = "costwarden.io/resumed-reason"


class StopReason(StrEnum):
    """Why costwarden stopped a workload (annotation value, Event reason, metric label)."""

    HARD_CAP_REACHED = "HardCapReached"
    """The team's USD hard cap for the period is reached."""
    TOKEN_CAP_REACHED = "TokenCapReached"
    """One of the team's token caps for the period is reached."""
    RETRY_LOOP_DETECTED = "RetryLoopDetected"
    """The job tripped the retry-loop heuristic (loopDetection)."""
    PER_JOB_CAP_REACHED = "PerJobCapReached"
    """The job reached its own perJob.maxCostUSD or perJob.maxTokens."""

    @property
    def team_wide(self) -> bool:
        """Team-wide reasons end with the cap (raised, or a new period); the others do not."""
        return self in (StopReason.HARD_CAP_REACHED, StopReason.TOKEN_CAP_REACHED)

    @property
    def suspended_for(self) -> str:
        return "cap" if self.team_wide else "job"


class ResumeReason(StrEnum):
    CAP_RAISED = "CapRaised"
    """The budget's spec changed and the team is no longer over its cap."""
    PERIOD_ROLLED_OVER = "PeriodRolledOver"
    """A new period started: spend is back to zero."""
    BUDGET_DELETED = "BudgetDeleted"
    """The TeamBudget that suspended the Job no longer exists."""


@dataclass(frozen=True, slots=True)
class StopMarks:
    """Who stops a workload, why and when: written onto it as labels and annotations."""

    budget_uid: str
    budget_id: str
    """namespace/name of the TeamBudget."""
    reason: StopReason
    at: str
    """RFC 3339, second resolution."""
    message: str


class StoppableWorkload(Protocol):
    """A workload enforcement can pause, resume or delete. Implementations write the marks
    above with the same patch that stops the workload, so the reason is never lost."""

    @property
    def kind(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...

    def is_suspended(self) -> bool: ...

    def is_finished(self) -> bool: ...

    async def suspend(self, marks: StopMarks) -> None: ...

    async def resume(self, reason: ResumeReason, at: str) -> None: ...

    async def delete(self, propagation: str) -> None: ...
