"""Enforcement at run time: stop a team's Jobs at its cap, a runaway Job alone, and resume.

Triggers, all level-checked against the current objects before acting:

- a status write that crosses into Exhausted (the accountant's commit hook): LIST the
  team's Jobs by label selector in its namespaces and stop the running ones;
- a loop signal, or a Job's own spend past ``perJob``: that Job alone;
- the lean Job watch: a Job that appears or runs again in an exhausted team is stopped,
  and a finished Job is counted for cost per result;
- a budget that is no longer exhausted (cap raised, new period, budget deleted): one
  cluster-wide LIST of the Jobs labelled ``suspended-for=cap`` resumes its Jobs.

Every action is recorded in the budget's ``status.recentActions`` (through the
accountant), as labels and annotations on the Job, and as an Event on both objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from datetime import datetime
from typing import Any

from costwarden.accounting.books import Books, timestamp
from costwarden.accounting.ledger import Applied
from costwarden.accounting.results import count_finish, job_outcome
from costwarden.api.accounting import JobOutcome
from costwarden.api.meta import API_VERSION
from costwarden.api.teambudget import MAX_RECENT_ACTIONS, EnforcementRecord, JobAction
from costwarden.api.usage import LoopKind, LoopSignal
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers import clock
from costwarden.controllers.accountant import Accountant, BudgetGoneError, Commit
from costwarden.controllers.budgets import Budget, BudgetIndex, is_exhausted
from costwarden.controllers.events import event_body, post_event
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.rest import ApiError, Rest, jobs_path
from costwarden.enforcement.decisions import (
    BudgetStanding,
    is_exempt,
    is_finished,
    is_suspended,
    jobs_to_resume,
    jobs_to_stop,
    over_job_cap,
    stop_reason,
)
from costwarden.enforcement.jobs import JobWorkload
from costwarden.enforcement.workload import (
    SUSPENDED_FOR_LABEL,
    ResumeReason,
    StopMarks,
    StopReason,
)
from costwarden.policy.caps import CapVerdict

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
FULL_RESUME_SECONDS = 300.0
"""A resume pass runs at least this often, healing anything a missed change left."""


class Enforcer:
    def __init__(
        self, rest: Rest, budgets: BudgetIndex, accountant: Accountant, leadership: Leadership
    ) -> None:
        self._rest = rest
        self._budgets = budgets
        self._accountant = accountant
        self._leadership = leadership
        self._tasks: set[asyncio.Task[None]] = set()
        self._exhausted: set[str] = set()
        self._stopped_by_watch: set[str] = set()
        self._last_resume = 0.0
        self._standings: dict[str, tuple[Budget, Mapping[str, Any], datetime, CapVerdict]] = {}
        accountant.on_commit = self.on_commit

    # -- triggers ----------------------------------------------------------------------

    def on_commit(self, commit: Commit) -> None:
        budget = commit.budget
        _observe_results(budget.id, commit.books)
        _observe_changes(budget.id, commit.books)
        if is_exhausted(commit.after) and not is_exhausted(commit.before):
            self._exhausted.add(budget.id)
            self._spawn(self.enforce_cap(budget, commit.after.reason, commit.after.message))
        for result in commit.results:
            if isinstance(result, Applied):
                self._runaway_jobs(budget, commit.books, result)

    def _runaway_jobs(self, budget: Budget, books: Books, applied: Applied) -> None:
        # The action is the budget's own (loopDetection.action), never the signal's; the
        # job is the reporting pod's owning Job, as ingestion recomputed it.
        loop_action = budget.spec.loop_detection.action
        for signal in applied.signals:
            if signal.loop is LoopKind.JOB_CAP_REACHED:
                # A call of the job no longer fits its per-job cap (ingestion checked that
                # the budget has one and that the action is its onHardCap.jobs).
                if signal.action is not JobAction.NONE and signal.job:
                    self._spawn(self.stop_named(budget, signal.namespace, signal.job,
                                                StopReason.PER_JOB_CAP_REACHED,
                                                _job_cap_message(signal.job, budget),
                                                signal.action))  # fmt: skip
                continue
            if loop_action is not JobAction.NONE and signal.job:
                self._spawn(self.stop_named(budget, signal.namespace, signal.job,
                                            StopReason.RETRY_LOOP_DETECTED, _loop_message(signal),
                                            loop_action))  # fmt: skip
        for key in applied.jobs:
            entry = books.jobs.get(key)
            message = over_job_cap(entry, budget.spec.per_job) if entry else None
            if message is not None:
                action = budget.spec.on_hard_cap.jobs
                if action is JobAction.NONE:
                    continue
                self._spawn(self.stop_named(budget, key[0], key[1],
                                            StopReason.PER_JOB_CAP_REACHED, f"job {message}",
                                            action))  # fmt: skip

    async def on_job_event(self, kind: str, job: dict[str, Any]) -> None:
        """The Job watch's callback: count finished Jobs, stop new ones of exhausted teams."""
        budget = self._budgets.for_job(job)
        if budget is None or not await self._leadership.is_leader():
            return
        finished = job_outcome(job, deleted=kind == "DELETED")
        if finished is not None:
            self._spawn(self._count_finish(budget, job, *finished))
            return
        if kind == "DELETED" or is_suspended(job) or is_finished(job):
            return
        standing = self._standing(budget, clock.now())
        if (
            is_exhausted(standing)
            and budget.spec.on_hard_cap.jobs is not JobAction.NONE
            and not is_exempt(job, budget.spec.exemptions)
        ):
            reason = stop_reason(standing.reason)
            action = budget.spec.on_hard_cap.jobs
            # Remember the crossing: should the cap be raised before the next level check
            # sees it, the relief must still trigger a resume pass for what this stops.
            # (Not in _exhausted: the level check must still stop the team's other Jobs.)
            self._stopped_by_watch.add(budget.id)
            log.info("%s: %s new Job %s/%s (%s)", budget.id, action.value,
                     job["metadata"].get("namespace"), job["metadata"].get("name"),
                     reason.value)  # fmt: skip
            self._spawn(self._stop(budget, job, reason, standing.message, action))

    async def run(self) -> None:
        """Level checks: stop the Jobs of budgets found exhausted (e.g. after a restart),
        resume those of budgets that no longer are."""
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            if not await self._leadership.is_leader():
                continue
            try:
                await self.check_once()
            except Exception:
                # Raised to the supervisor (controllers/accounting_main.py), which restarts
                # this loop with backoff and logs once per incident, not once a second.
                metrics.ENFORCEMENT_ERRORS.inc()
                raise

    async def check_once(self) -> None:
        now = clock.now()
        standings = {b.id: self._standing(b, now) for b in self._budgets.all()}
        exhausted = {budget_id for budget_id, v in standings.items() if is_exhausted(v)}
        for budget_id in exhausted - self._exhausted:
            budget = self._budgets.get(budget_id)
            if budget is not None:
                verdict = standings[budget_id]
                self._spawn(self.enforce_cap(budget, verdict.reason, verdict.message))
        for budget in self._budgets.all():
            if _period_ended(self._accountant.status_of(budget), now):
                # Roll over now rather than at the reconciler's next pass: resumes and a
                # fresh period should not wait for its resync.
                self._spawn(self._mutate(budget, _no_change))
        relieved = (self._exhausted | self._stopped_by_watch) - exhausted
        self._exhausted = exhausted
        self._stopped_by_watch = set()
        if relieved or time.monotonic() - self._last_resume > FULL_RESUME_SECONDS:
            await self.resume_pass()

    def _standing(self, budget: Budget, now: datetime) -> CapVerdict:
        """The budget's verdict, recomputed only when its spec, status or period changed:
        the level check asks for every budget every second."""
        status = self._accountant.status_of(budget)
        start = budget.period(now)[0]
        cached = self._standings.get(budget.id)
        if (
            cached is not None
            and cached[0] is budget
            and cached[1] is status
            and cached[2] == start
        ):
            return cached[3]
        verdict = budget.standing(now, status)
        self._standings[budget.id] = (budget, status, start, verdict)
        return verdict

    # -- actions -----------------------------------------------------------------------

    async def enforce_cap(self, budget: Budget, cap_reason: str, message: str) -> None:
        action = budget.spec.on_hard_cap.jobs
        if action is JobAction.NONE:
            return
        started = time.monotonic()
        jobs = await self._team_jobs(budget)
        log.debug("%s: listed %d Job(s) in %.3fs", budget.id, len(jobs), time.monotonic() - started)
        targets = jobs_to_stop(jobs, budget.spec, budget.governed)
        reason = stop_reason(cap_reason)
        await asyncio.gather(*(self._stop(budget, job, reason, message, action) for job in targets))
        if targets:
            log.info("%s: %s %d Job(s) in %.3fs", budget.id, reason.value, len(targets),
                     time.monotonic() - started)  # fmt: skip

    async def stop_named(
        self,
        budget: Budget,
        namespace: str,
        name: str,
        reason: StopReason,
        message: str,
        action: JobAction,
    ) -> None:
        try:
            job = await self._rest.get(jobs_path(namespace, name))
        except ApiError as error:
            if error.status == 404:
                return  # a pod outside any Job, or the Job is gone
            raise
        if not budget.selects(job) or is_exempt(job, budget.spec.exemptions):
            return  # not this team's Job (a signal never stops another team's work)
        if is_suspended(job) or is_finished(job):
            return
        await self._stop(budget, job, reason, message, action)

    async def _team_jobs(self, budget: Budget) -> list[dict[str, Any]]:
        """One LIST per *governed* namespace (never a claimed one), by label selector."""
        selector = budget.spec.workloads.selector
        params = {"labelSelector": selector.to_query()} if selector else {}
        pages = await asyncio.gather(
            *(self._rest.get(jobs_path(ns), params) for ns in budget.namespaces)
        )
        return [job for page in pages for job in page.get("items") or []]

    async def _stop(
        self, budget: Budget, job: Mapping[str, Any], reason: StopReason, message: str,
        action: JobAction,
    ) -> None:  # fmt: skip
        started = time.monotonic()
        workload = JobWorkload(self._rest, job)
        at = timestamp(clock.now())
        try:
            if action is JobAction.DELETE:
                await workload.delete(budget.spec.on_hard_cap.delete_propagation.value)
                verb = "Deleted"
            else:
                await workload.suspend(StopMarks(budget.uid, budget.id, reason, at, message))
                verb = "Suspended"
        except ApiError as error:
            if error.status in (404, 409, 422):
                return  # gone or replaced meanwhile; the next level check decides again
            metrics.ENFORCEMENT_ERRORS.inc()
            raise
        metrics.CAP_TO_ACTION.observe(time.monotonic() - started)
        log.debug("%s Job %s/%s in %.3fs", verb, workload.namespace, workload.name,
                  time.monotonic() - started)  # fmt: skip
        metrics.ENFORCEMENT_ACTIONS.labels(kind=verb, reason=reason.value).inc()
        text = f"{verb} by TeamBudget {budget.id}: {message}"
        await self._record(budget, workload, verb, reason.value, text, warning=True)
        if action is JobAction.DELETE:
            await self._count_finish(budget, job, JobOutcome.STOPPED_BY_COSTWARDEN, at)

    async def resume_pass(self) -> None:
        self._last_resume = time.monotonic()
        listing = await self._rest.get(jobs_path(), {"labelSelector": f"{SUSPENDED_FOR_LABEL}=cap"})
        now = clock.now()
        standings = {
            b.uid: BudgetStanding(b.uid, is_exhausted(self._standing(b, now)), b.period(now)[0])
            for b in self._budgets.all()
        }
        by_uid = self._budgets.by_uid()
        for job, reason in jobs_to_resume(listing.get("items") or [], standings):
            budget = by_uid.get(job["metadata"]["labels"].get("costwarden.io/suspended-by", ""))
            if budget is not None and job["metadata"].get("namespace") not in budget.governed:
                # Labels are the Job owner's to write: a Job outside the budget's governed
                # namespaces (consent withdrawn, or labels forged) is resumed, never recorded
                # in that budget's status or Events.
                budget = None
            await self._resume(budget, job, reason)

    async def _resume(
        self, budget: Budget | None, job: Mapping[str, Any], reason: ResumeReason
    ) -> None:
        workload = JobWorkload(self._rest, job)
        try:
            await workload.resume(reason, timestamp(clock.now()))
        except ApiError as error:
            if error.status in (404, 409):
                return
            raise
        metrics.ENFORCEMENT_ACTIONS.labels(kind="Resumed", reason=reason.value).inc()
        text = f"Resumed: {_resume_message(reason)}"
        if budget is None:
            await self._job_event(workload, "Resumed", reason.value, text, warning=False)
            return
        await self._record(budget, workload, "Resumed", reason.value, text, warning=False)

    # -- records -----------------------------------------------------------------------

    async def _record(
        self, budget: Budget, workload: JobWorkload, verb: str, reason: str, message: str,
        *, warning: bool,
    ) -> None:  # fmt: skip
        record = EnforcementRecord(
            time=clock.now().replace(microsecond=0),
            action=verb,
            target=f"Job/{workload.namespace}/{workload.name}",
            reason=reason,
            message=message[:1024],
        )

        def append(books: Books, now: datetime) -> None:
            books.actions = [*books.actions, record][-MAX_RECENT_ACTIONS:]

        await asyncio.gather(
            self._job_event(workload, verb, reason, message, warning=warning),
            post_event(
                self._rest,
                event_body(
                    api_version=API_VERSION,
                    kind="TeamBudget",
                    namespace=budget.namespace,
                    name=budget.name,
                    uid=budget.uid,
                    event_type="Warning" if warning else "Normal",
                    reason=reason,
                    message=f"{verb} Job {workload.namespace}/{workload.name}: {message}",
                ),
            ),
            self._mutate(budget, append),
        )

    async def _job_event(
        self, workload: JobWorkload, verb: str, reason: str, message: str, *, warning: bool
    ) -> None:
        body = event_body(
            api_version="batch/v1", kind="Job", namespace=workload.namespace,
            name=workload.name, uid=workload.uid, event_type="Warning" if warning else "Normal",
            reason=reason, message=message,
        )  # fmt: skip
        await post_event(self._rest, body)

    async def _count_finish(
        self, budget: Budget, job: Mapping[str, Any], outcome: JobOutcome, when: str
    ) -> None:
        meta = job.get("metadata") or {}
        try:
            finished = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            finished = clock.now()

        def count(books: Books, now: datetime) -> bool:
            return count_finish(books, meta.get("namespace", ""), meta.get("name", ""),
                                outcome, finished)  # fmt: skip

        await self._mutate(budget, count)

    async def _mutate(self, budget: Budget, mutation: Any) -> None:
        with contextlib.suppress(BudgetGoneError):
            await self._accountant.mutate(budget.id, mutation)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _logged(work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    except Exception:
        metrics.ENFORCEMENT_ERRORS.inc()
        log.exception("enforcement action failed (the next level check retries)")


def _no_change(books: Books, now: datetime) -> None:
    """Reading the books opens the new period; writing them back records it."""


def _period_ended(status: Mapping[str, Any], now: datetime) -> bool:
    window = status.get("currentPeriod") or {}
    end = window.get("end") if isinstance(window, Mapping) else None
    if not isinstance(end, str):
        return False
    try:
        return datetime.fromisoformat(end.replace("Z", "+00:00")) <= now
    except ValueError:
        return False


def _job_cap_message(job: str, budget: Budget) -> str:
    per_job = budget.spec.per_job
    caps = []
    if per_job is not None and per_job.max_cost_usd is not None:
        caps.append(f"perJob.maxCostUSD {per_job.max_cost_usd} USD")
    if per_job is not None and per_job.max_tokens is not None:
        caps.append(f"perJob.maxTokens {per_job.max_tokens}")
    return (
        f"job {job}: its next call does not fit its {' or '.join(caps) or 'perJob cap'} "
        "even at the policy's default output ceiling (refused at reservation)"
    )


def _loop_message(signal: LoopSignal) -> str:
    return (
        f"job {signal.job} tripped the retry-loop heuristic ({signal.loop.value}: "
        f"{signal.count} in {signal.window_seconds} s)"
    )


def _resume_message(reason: ResumeReason) -> str:
    return {
        ResumeReason.CAP_RAISED: "the TeamBudget is no longer over its cap (the cap was raised)",
        ResumeReason.PERIOD_ROLLED_OVER: "a new budget period started; spend is back to zero",
        ResumeReason.BUDGET_DELETED: "the TeamBudget that suspended it no longer exists",
    }[reason]


def _observe_results(team: str, books: Books) -> None:
    results = books.results()
    for outcome, tally in (
        (JobOutcome.SUCCEEDED, results.succeeded),
        (JobOutcome.FAILED, results.failed),
        (JobOutcome.STOPPED_BY_COSTWARDEN, results.stopped_by_costwarden),
    ):
        metrics.RESULT_JOBS.labels(team=team, outcome=outcome.value).set(tally.jobs)
        metrics.RESULT_SPENT.labels(team=team, outcome=outcome.value).set(float(tally.spent_usd))
    if results.cost_per_succeeded_job_usd is not None:
        metrics.COST_PER_SUCCEEDED_JOB.labels(team=team).set(
            float(results.cost_per_succeeded_job_usd)
        )
    metrics.WASTED.labels(team=team).set(float(results.wasted_usd))


_CHANGE_SERIES: dict[str, set[str]] = {}
"""The repositories each team's change gauges were last set for (to drop gone ones)."""


def _observe_changes(team: str, books: Books) -> None:
    """Change gauges from the books: a repository gone from them (a new period) loses its
    series, so a dashboard never shows last period's cost per merged change as current."""
    status = books.changes.status()
    now = {repo.repository for repo in status.by_repository}
    for gone in _CHANGE_SERIES.get(team, set()) - now:
        for outcome in ("merged", "closed", "reverted", "open"):
            with contextlib.suppress(KeyError):
                metrics.CHANGE_SPENT.remove(team, gone, outcome)
            if outcome != "open":
                with contextlib.suppress(KeyError):
                    metrics.CHANGES.remove(team, gone, outcome)
        with contextlib.suppress(KeyError):
            metrics.COST_PER_MERGED_CHANGE.remove(team, gone)
    _CHANGE_SERIES[team] = now
    for repo in status.by_repository:
        name = repo.repository
        for outcome, tally in (("merged", repo.merged), ("closed", repo.closed),
                               ("reverted", repo.reverted)):  # fmt: skip
            metrics.CHANGES.labels(team=team, repository=name, outcome=outcome).set(tally.changes)
            metrics.CHANGE_SPENT.labels(team=team, repository=name, outcome=outcome).set(
                float(tally.spent_usd)
            )
        metrics.CHANGE_SPENT.labels(team=team, repository=name, outcome="open").set(
            float(repo.open_usd)
        )
        if repo.cost_per_merged_change_usd is not None:
            metrics.COST_PER_MERGED_CHANGE.labels(team=team, repository=name).set(
                float(repo.cost_per_merged_change_usd)
            )
    if status.by_repository or team in _CHANGE_SERIES:
        metrics.NEVER_MERGED.labels(team=team).set(float(status.never_merged_usd))
