"""Cost per result (pure): which outcome a finished agent Job had, and counting it once.

A Job is counted in the period in which it finished, with the spend it had in that period.
A Job is counted once even when the Job watch lists it again (after a restart): a Job
already carrying an outcome in ``byJob`` is skipped, and so is one that finished before
the last finish counted (``results.lastFinish``); see docs/accounting.md for the corner
this leaves (a job evicted from ``byJob`` finishing in the same second as the last one).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from costwarden.accounting.books import Books, JobEntry, Spend
from costwarden.api.accounting import JobOutcome
from costwarden.enforcement.workload import STOPPED_BY_ANNOTATION, SUSPENDED_BY_LABEL


def job_outcome(job: Mapping[str, Any], *, deleted: bool = False) -> tuple[JobOutcome, str] | None:
    """The outcome of a finished Job and when it finished; None while it has not finished.

    A Job that costwarden stopped (annotated) and that then failed, or that was deleted
    while suspended by costwarden, counts as StoppedByCostwarden: its spend is waste
    caused by the budget, not a failure of the agent.
    """
    metadata = job.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    stopped = STOPPED_BY_ANNOTATION in annotations
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        when = str(condition.get("lastTransitionTime") or "")
        if condition.get("type") == "Complete":
            return JobOutcome.SUCCEEDED, when
        if condition.get("type") == "Failed":
            return (JobOutcome.STOPPED_BY_COSTWARDEN if stopped else JobOutcome.FAILED), when
    if deleted and SUSPENDED_BY_LABEL in labels:
        return JobOutcome.STOPPED_BY_COSTWARDEN, str(metadata.get("deletionTimestamp") or "")
    return None


def count_finish(
    books: Books, namespace: str, name: str, outcome: JobOutcome, finished: datetime
) -> bool:
    """Count a finished Job in the books' results; False if it was counted already or
    finished outside the books' period."""
    if not books.start <= finished < books.end:
        return False
    key = (namespace, name)
    entry = books.jobs.get(key)
    if entry is not None and entry.outcome is not None:
        return False
    if entry is None and books.last_finish is not None and finished < books.last_finish:
        return False
    if entry is None:
        entry = books.jobs[key] = JobEntry()
    entry.outcome = outcome
    tally = books.outcomes.setdefault(outcome, Spend())
    tally.requests += 1  # Spend.requests counts jobs in an outcome tally
    tally.usd += entry.spend.usd
    if books.last_finish is None or finished > books.last_finish:
        books.last_finish = finished
    return True
