"""A team's books for one period: what the accounting owns in TeamBudget.status, as numbers.

:class:`Books` is read from a status (``Books.read``), changed by the pure functions of
:mod:`costwarden.accounting.ledger` and :mod:`costwarden.accounting.results`, and written
back as a merge-patch fragment (``Books.fragment``) holding only the fields the accounting
owns, so it never touches what the reconciler writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from pydantic import ValidationError

from costwarden.accounting.changes import ChangeBooks
from costwarden.api.accounting import (
    MAX_HISTORY,
    ClosedPeriod,
    Ingestion,
    JobBreakdown,
    JobOutcome,
    JobSpend,
    LeaseHolder,
    Leases,
    ModelSpend,
    OutcomeTally,
    Results,
    SourceCursor,
    TokenUsage,
    format_exact,
)
from costwarden.api.money import MICRO, format_money
from costwarden.api.teambudget import MAX_RECENT_ACTIONS, EnforcementRecord, TeamBudgetStatus

OWNED_FIELDS = (
    "spentUSD",
    "spentExactUSD",
    "tokens",
    "currentPeriod",
    "byModel",
    "byJob",
    "results",
    "changes",
    "history",
    "ingestion",
    "recentActions",
    "leases",
)
"""Status fields the accounting writes; the reconciler writes the others."""


def display_usd(exact: Decimal) -> Decimal:
    """Six decimals, rounded *down*: with a cap of at most six decimals, ``display >= cap``
    exactly when ``exact >= cap``, so the reconciler (reading spentUSD) and the accounting
    (reading spentExactUSD) always agree on whether a cap is reached."""
    return exact.quantize(MICRO, rounding=ROUND_FLOOR)


@dataclass
class Spend:
    usd: Decimal = Decimal(0)
    tokens: int = 0
    requests: int = 0


@dataclass
class JobEntry:
    spend: Spend = field(default_factory=Spend)
    outcome: JobOutcome | None = None


@dataclass
class Cursor:
    seq: int
    last_seen: datetime


@dataclass
class Lease:
    """One replica's lease (policy/leases.py): what it may still have in use."""

    amount: Decimal
    in_use: Decimal
    renewed: datetime


@dataclass
class Books:
    """The accounting state of one TeamBudget in the period [start, end)."""

    start: datetime
    end: datetime
    spent: Decimal = Decimal(0)
    tokens: TokenUsage = field(default_factory=TokenUsage)
    models: dict[str, Spend] = field(default_factory=dict)
    jobs: dict[tuple[str, str], JobEntry] = field(default_factory=dict)
    other_jobs: Decimal = Decimal(0)
    outcomes: dict[JobOutcome, Spend] = field(default_factory=dict)
    last_finish: datetime | None = None
    history: list[ClosedPeriod] = field(default_factory=list)
    cursors: dict[str, Cursor] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0
    late_records: int = 0
    last_applied: datetime | None = None
    actions: list[EnforcementRecord] = field(default_factory=list)
    leases: dict[str, Lease] = field(default_factory=dict)
    """Budget lent to gateway replicas, by holder (= usage cursor key)."""
    refused_need: Decimal | None = None
    """The smallest call refused at the cap this period (policy/leases.py)."""
    changes: ChangeBooks = field(default_factory=ChangeBooks)

    # -- reading and writing status ----------------------------------------------------

    @classmethod
    def read(cls, status: Mapping[str, Any], start: datetime, end: datetime) -> Books:
        """The books of [start, end) from status; a status of an earlier period is rolled
        over (closed into history); a status that does not parse starts afresh."""
        try:
            parsed = TeamBudgetStatus.model_validate(status)
        except ValidationError:
            parsed = TeamBudgetStatus()
        books = cls(start=start, end=end)
        books.history = list(parsed.history)
        books.actions = list(parsed.recent_actions)
        ingestion = parsed.ingestion or Ingestion()
        books.cursors = {c.source: Cursor(c.seq, c.last_seen) for c in ingestion.cursors}
        window = parsed.current_period
        if window is None:
            return books
        if window.start == start:
            books._load_current(parsed, ingestion)
        elif window.start < start:
            books.history = _closed_history(parsed, books.history)
            # Leases outlive the period: a replica may still spend what it was lent, and
            # that now counts against the new period (policy/leases.py).
            books._load_leases(parsed, with_refusal=False)
        # A status of a *later* period (a clock behind the writer's) is left as is: the
        # fragment would move it backwards, so callers refuse to write it (see is_behind).
        return books

    def _load_current(self, parsed: TeamBudgetStatus, ingestion: Ingestion) -> None:
        exact = parsed.spent_exact_usd
        self.spent = exact if exact is not None else parsed.spent_usd or Decimal(0)
        self.tokens = parsed.tokens or TokenUsage()
        self.models = {m.model: Spend(m.spent_usd, m.tokens, m.requests) for m in parsed.by_model}
        breakdown = parsed.by_job or JobBreakdown()
        self.jobs = {
            (j.namespace, j.name): JobEntry(Spend(j.spent_usd, j.tokens, j.requests), j.outcome)
            for j in breakdown.jobs
        }
        self.other_jobs = breakdown.other_usd
        results = parsed.results or Results()
        self.outcomes = {
            outcome: Spend(tally.spent_usd, 0, tally.jobs)
            for outcome, tally in _tallies(results).items()
        }
        self.last_finish = results.last_finish
        self.changes = ChangeBooks.read(parsed.changes)
        self.records = ingestion.records
        self.duplicates = ingestion.duplicates
        self.late_records = ingestion.late_records
        self.last_applied = ingestion.last_applied
        self._load_leases(parsed, with_refusal=True)

    def _load_leases(self, parsed: TeamBudgetStatus, *, with_refusal: bool) -> None:
        if parsed.leases is None:
            return
        self.leases = {
            h.holder: Lease(h.leased_usd, h.in_use_usd, h.renewed) for h in parsed.leases.holders
        }
        if with_refusal:
            self.refused_need = parsed.leases.refused_need_usd

    def results(self) -> Results:
        def tally(outcome: JobOutcome) -> OutcomeTally:
            spend = self.outcomes.get(outcome, Spend())
            return OutcomeTally(jobs=spend.requests, spent_usd=spend.usd)

        succeeded = tally(JobOutcome.SUCCEEDED)
        failed = tally(JobOutcome.FAILED)
        stopped = tally(JobOutcome.STOPPED_BY_COSTWARDEN)
        per_job = (succeeded.spent_usd / succeeded.jobs).quantize(MICRO) if succeeded.jobs else None
        return Results(
            succeeded=succeeded,
            failed=failed,
            stopped_by_costwarden=stopped,
            cost_per_succeeded_job_usd=per_job,
            wasted_usd=failed.spent_usd + stopped.spent_usd,
            last_finish=self.last_finish,
        )

    def fragment(self) -> dict[str, Any]:
        """The merge patch of every owned field (explicit nulls where a key must go away)."""
        jobs = [
            JobSpend(
                namespace=ns,
                name=name,
                spent_usd=entry.spend.usd,
                tokens=entry.spend.tokens,
                requests=entry.spend.requests,
                outcome=entry.outcome,
            ).to_wire()
            for (ns, name), entry in sorted(self.jobs.items())
        ]
        results = self.results().to_wire()
        results.setdefault("costPerSucceededJobUSD", None)
        results.setdefault("lastFinish", None)
        ingestion = Ingestion(
            cursors=[
                SourceCursor(source=s, seq=c.seq, last_seen=c.last_seen)
                for s, c in sorted(self.cursors.items())
            ],
            records=self.records,
            duplicates=self.duplicates,
            late_records=self.late_records,
            last_applied=self.last_applied,
        ).to_wire()
        ingestion.setdefault("lastApplied", None)
        leases = Leases(
            leased_usd=sum((lease.amount for lease in self.leases.values()), Decimal(0)),
            holders=[
                LeaseHolder(
                    holder=holder,
                    leased_usd=lease.amount,
                    in_use_usd=lease.in_use,
                    renewed=lease.renewed,
                )
                for holder, lease in sorted(self.leases.items())
            ],
            refused_need_usd=self.refused_need,
        ).to_wire()
        leases.setdefault("refusedNeedUSD", None)
        for holder in leases["holders"]:
            holder["renewed"] = timestamp(self.leases[holder["holder"]].renewed)
        changes = self.changes.status().to_wire()
        changes.setdefault("costPerMergedChangeUSD", None)
        return {
            "spentUSD": format_money(display_usd(self.spent)),
            "spentExactUSD": format_exact(self.spent),
            "tokens": self.tokens.to_wire(),
            "currentPeriod": {"start": timestamp(self.start), "end": timestamp(self.end)},
            "byModel": [
                ModelSpend(
                    model=name, spent_usd=s.usd, tokens=s.tokens, requests=s.requests
                ).to_wire()
                for name, s in sorted(self.models.items())
            ],
            "byJob": {"jobs": jobs, "otherUSD": format_exact(self.other_jobs)},
            "results": results,
            "changes": changes,
            "history": [_history_wire(p) for p in self.history[-MAX_HISTORY:]],
            "ingestion": ingestion,
            "leases": leases,
            "recentActions": [
                {**a.to_wire(), "time": timestamp(a.time)}
                for a in self.actions[-MAX_RECENT_ACTIONS:]
            ],
        }

    def close(self) -> ClosedPeriod:
        """This period as a history entry."""
        return ClosedPeriod(
            start=self.start,
            end=self.end,
            spent_usd=display_usd(self.spent),
            spent_exact_usd=self.spent,
            tokens=self.tokens,
            results=self.results(),
            changes=self.changes.summary(),
        )


def is_behind(status: Mapping[str, Any], start: datetime) -> bool:
    """Whether status already holds a period later than ``start`` (the writer's clock lags)."""
    window = status.get("currentPeriod") or {}
    recorded = window.get("start") if isinstance(window, Mapping) else None
    if not isinstance(recorded, str):
        return False
    try:
        return datetime.fromisoformat(recorded.replace("Z", "+00:00")) > start
    except ValueError:
        return False


def timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _tallies(results: Results) -> dict[JobOutcome, OutcomeTally]:
    return {
        JobOutcome.SUCCEEDED: results.succeeded,
        JobOutcome.FAILED: results.failed,
        JobOutcome.STOPPED_BY_COSTWARDEN: results.stopped_by_costwarden,
    }


def _closed_history(parsed: TeamBudgetStatus, history: list[ClosedPeriod]) -> list[ClosedPeriod]:
    """History with the status's (ended) period appended, once."""
    window = parsed.current_period
    assert window is not None
    if any(p.start == window.start for p in history):
        return history
    previous = Books(start=window.start, end=window.end)
    previous._load_current(parsed, parsed.ingestion or Ingestion())
    return [*history, previous.close()][-MAX_HISTORY:]


def _history_wire(period: ClosedPeriod) -> dict[str, Any]:
    wire = period.to_wire()
    wire["start"], wire["end"] = timestamp(period.start), timestamp(period.end)
    if period.results.last_finish is not None:
        wire["results"]["lastFinish"] = timestamp(period.results.last_finish)
    return wire
