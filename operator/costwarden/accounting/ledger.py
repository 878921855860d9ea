"""Applying numbered usage to a team's books exactly once (pure).

Each source (a gateway replica's ledger) numbers its entries with a strictly increasing
``seq`` and delivers them in order, re-sending a whole batch until it is acknowledged.
So for one team and one source, every entry at or below the highest ``seq`` already
applied (the *cursor*, kept in the same status object as the totals and written in the
same patch) has been counted; anything above it has not. One number per source and team
replaces a set of record ids, and survives restarts because it lives in the API server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from costwarden.accounting.books import Books, Cursor, JobEntry, Spend, display_usd
from costwarden.accounting.changes import count_change
from costwarden.api.accounting import MAX_CURSORS, MAX_JOBS, MAX_MODELS, ClosedPeriod
from costwarden.api.usage import LoopSignal, UsageRecord

OTHER_MODEL = "other"
MAX_MODEL_NAME = 128
CURSOR_IDLE = timedelta(days=35)
"""A source silent this long is forgotten: longer than a month, so a gateway coming back
after a long outage still finds its cursor (see docs/accounting.md)."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    record: UsageRecord | None = None
    signal: LoopSignal | None = None


@dataclass
class Applied:
    """What one batch did to one team's books."""

    records: list[UsageRecord] = field(default_factory=list)
    signals: list[LoopSignal] = field(default_factory=list)
    duplicates: int = 0
    late: int = 0
    jobs: set[tuple[str, str]] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        return bool(self.records or self.signals or self.late)


def apply_entries(
    books: Books, source: str, entries: Sequence[Entry], now: datetime, *, legacy: str = ""
) -> Applied:
    """Count every entry above the source's cursor once; advance the cursor.

    ``source`` is the cursor key, ``<reporter>#<source id>`` (accounting.trust.Reporter):
    a reporter advances only its own cursors. ``legacy`` is the bare source id that keyed
    the cursor before reporters were part of the key: a cursor found under it is taken
    over (moved to ``source``) once, so an upgrade neither re-counts nor loses anything.
    """
    applied = Applied()
    cursor = books.cursors.get(source)
    if cursor is None and legacy and "#" not in legacy and legacy in books.cursors:
        cursor = books.cursors.pop(legacy)
    high = cursor.seq if cursor else 0
    for entry in sorted(entries, key=lambda e: e.seq):
        if entry.seq <= high:
            applied.duplicates += 1
            continue
        high = entry.seq
        if entry.signal is not None:
            applied.signals.append(entry.signal)
        elif entry.record is not None:
            _count(books, entry.record, applied)
            _draw_lease(books, source, entry.record)
    if entries:
        books.cursors[source] = Cursor(high, now)
    books.duplicates += applied.duplicates
    books.records += len(applied.records)
    books.late_records += applied.late
    if applied.changed:
        books.last_applied = now
    _bound_jobs(books)
    return applied


def _count(books: Books, record: UsageRecord, applied: Applied) -> None:
    if record.time < books.start:
        if not _add_to_history(books, record):
            applied.late += 1
        return
    applied.records.append(record)
    if not record.usage_reported:
        return  # refused or failed calls cost nothing; they still advance the cursor
    cost = record.cost_usd
    tokens = record.tokens
    books.spent += cost
    books.tokens = books.tokens.plus(tokens)
    total = tokens.total()
    # byModel[].model holds 128 characters (the schema); a longer name (a hostile or broken
    # upstream's) is cut, never a reason the team's books cannot be written.
    name = (record.served_model or record.requested_model or "unknown")[:MAX_MODEL_NAME]
    if name not in books.models and len(books.models) >= MAX_MODELS - 1:
        name = OTHER_MODEL
    _add(books.models.setdefault(name, Spend()), cost, total)
    count_change(books.changes, record)
    if not record.job:
        books.other_jobs += cost
        return
    key = (record.namespace, record.job)
    job = books.jobs.setdefault(key, JobEntry())
    _add(job.spend, cost, total)
    if job.outcome is not None:  # late usage of a finished job still belongs to its result
        books.outcomes.setdefault(job.outcome, Spend()).usd += cost
    applied.jobs.add(key)


def _draw_lease(books: Books, source: str, record: UsageRecord) -> None:
    """Usage applied moves its cost from the reporter's lease to spend, in the same write:
    the operator's ``spent + leases <= cap`` (policy/leases.py) never counts it twice."""
    lease = books.leases.get(source)
    if lease is None or not record.usage_reported or record.time < books.start:
        return
    lease.amount = max(lease.amount - record.cost_usd, Decimal(0))
    lease.in_use = max(lease.in_use - record.cost_usd, Decimal(0))


def _add(spend: Spend, cost: Decimal, tokens: int) -> None:
    spend.usd += cost
    spend.tokens += tokens
    spend.requests += 1


def _add_to_history(books: Books, record: UsageRecord) -> bool:
    """A record of a closed period still kept in history is added there (late delivery)."""
    for index, period in enumerate(books.history):
        if period.start <= record.time < period.end:
            if record.usage_reported:
                exact = period.spent_exact_usd + record.cost_usd
                books.history[index] = ClosedPeriod(
                    start=period.start,
                    end=period.end,
                    spent_usd=display_usd(exact),
                    spent_exact_usd=exact,
                    tokens=period.tokens.plus(record.tokens),
                    results=period.results,
                    changes=period.changes,
                )
            return True
    return False


def _bound_jobs(books: Books) -> None:
    """Keep at most MAX_JOBS entries: finished jobs go first (their spend is already in
    results), then the running jobs that spent least (their spend moves to otherUSD)."""
    excess = len(books.jobs) - MAX_JOBS
    if excess <= 0:
        return
    ranked = sorted(
        books.jobs.items(), key=lambda kv: (kv[1].outcome is None, kv[1].spend.usd, kv[0])
    )
    for key, entry in ranked[:excess]:
        if entry.outcome is None:
            books.other_jobs += entry.spend.usd
        del books.jobs[key]


def prune_cursors(books: Books, now: datetime, idle: timedelta = CURSOR_IDLE) -> int:
    """Forget sources silent for ``idle``, and the least recent beyond MAX_CURSORS."""
    before = len(books.cursors)
    books.cursors = {s: c for s, c in books.cursors.items() if now - c.last_seen <= idle}
    if len(books.cursors) > MAX_CURSORS:
        newest = sorted(books.cursors.items(), key=lambda kv: kv[1].last_seen)[-MAX_CURSORS:]
        books.cursors = dict(newest)
    return before - len(books.cursors)
