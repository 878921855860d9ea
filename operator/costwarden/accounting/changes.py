"""Cost per result beyond Jobs (pure): spend tagged with a change, joined to its outcome.

A usage record whose pod carries a ``change`` tag (and usually a ``repository`` tag) adds
its cost to that change in the team's books (:func:`count_change`). When CI or a Git forge
reports how the change ended (:func:`apply_outcome`), its spend moves from the
repository's open spend to the outcome's tally: cost per merged change is the merged
tally's spend over its count, and the closed tally is the spend on changes that never
merged.

Like Jobs (accounting.results), a change is counted in the period its outcome arrives,
with the spend it had in that period; spend arriving after the outcome joins the same
tally. Reports are idempotent: a report no later than the one applied (a forge's
redelivery, a replayed fixture) changes nothing, and a later one moves the change from
its old tally to the new one (merged, then reverted). Bounded: at most MAX_CHANGES
changes and MAX_REPOSITORIES repositories per team and period (docs/attribution.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from costwarden.api.accounting import (
    MAX_CHANGES,
    MAX_REPOSITORIES,
    OTHER_REPOSITORY,
    Changes,
    ChangeSpend,
    ChangeTally,
    RepositoryChanges,
)
from costwarden.api.results import ChangeOutcome, ChangeResult
from costwarden.api.usage import UsageRecord
from costwarden.policy.attribution import INVALID

PER_CHANGE_QUANTUM = Decimal("1e-18")
"""Cost per merged change carries 18 decimals (what ExactAmount holds)."""


@dataclass
class ChangeEntry:
    usd: Decimal = Decimal(0)
    requests: int = 0
    outcome: ChangeResult | None = None
    ended: datetime | None = None


@dataclass
class RepositoryTally:
    counts: dict[ChangeResult, int] = field(default_factory=dict)
    spent: dict[ChangeResult, Decimal] = field(default_factory=dict)
    open_usd: Decimal = Decimal(0)

    def add(self, outcome: ChangeResult | None, usd: Decimal, changes: int = 0) -> None:
        if outcome is None:
            self.open_usd += usd
            return
        self.spent[outcome] = self.spent.get(outcome, Decimal(0)) + usd
        self.counts[outcome] = self.counts.get(outcome, 0) + changes


@dataclass
class ChangeBooks:
    """The change part of a team's books for one period."""

    changes: dict[tuple[str, str], ChangeEntry] = field(default_factory=dict)
    repositories: dict[str, RepositoryTally] = field(default_factory=dict)

    def bucket(self, repository: str) -> str:
        """The repository's tally key: itself, or OTHER_REPOSITORY once the list is full.
        Stable within a period (repositories are never removed)."""
        if repository in self.repositories or len(self.repositories) < MAX_REPOSITORIES - 1:
            return repository
        return OTHER_REPOSITORY

    def tally(self, repository: str) -> RepositoryTally:
        return self.repositories.setdefault(self.bucket(repository), RepositoryTally())

    # -- status --------------------------------------------------------------------------

    @classmethod
    def read(cls, status: Changes | None) -> ChangeBooks:
        books = cls()
        if status is None:
            return books
        for repo in status.by_repository:
            tally = RepositoryTally(open_usd=repo.open_usd)
            for outcome, part in _parts(repo).items():
                tally.counts[outcome] = part.changes
                tally.spent[outcome] = part.spent_usd
            books.repositories[repo.repository] = tally
        for change in status.changes:
            books.changes[(change.repository, change.change)] = ChangeEntry(
                change.spent_usd, change.requests, change.outcome, change.ended
            )
        return books

    def status(self) -> Changes:
        repositories = []
        merged_usd, merged = Decimal(0), 0
        never, reverted = Decimal(0), Decimal(0)
        for name, tally in sorted(self.repositories.items()):
            parts = {
                outcome.value: ChangeTally(
                    changes=tally.counts.get(outcome, 0),
                    spent_usd=tally.spent.get(outcome, Decimal(0)),
                )
                for outcome in ChangeResult
            }
            count = tally.counts.get(ChangeResult.MERGED, 0)
            usd = tally.spent.get(ChangeResult.MERGED, Decimal(0))
            repositories.append(
                RepositoryChanges(
                    repository=name,
                    **parts,
                    open_usd=tally.open_usd,
                    cost_per_merged_change_usd=per_change(usd, count),
                )
            )
            merged_usd, merged = merged_usd + usd, merged + count
            never += tally.spent.get(ChangeResult.CLOSED, Decimal(0))
            reverted += tally.spent.get(ChangeResult.REVERTED, Decimal(0))
        listed = sorted(
            self.changes.items(),
            key=lambda kv: (kv[1].outcome is not None, -kv[1].usd, kv[0]),
        )
        return Changes(
            by_repository=repositories,
            changes=[
                ChangeSpend(
                    repository=repo,
                    change=change,
                    spent_usd=entry.usd,
                    requests=entry.requests,
                    outcome=entry.outcome,
                    ended=entry.ended,
                )
                for (repo, change), entry in listed
            ],
            cost_per_merged_change_usd=per_change(merged_usd, merged),
            never_merged_usd=never,
            reverted_usd=reverted,
        )

    def summary(self) -> Changes | None:
        """The period's tallies for history: by repository, without the per-change list."""
        if not self.repositories:
            return None
        return self.status().model_copy(update={"changes": []})


def per_change(usd: Decimal, changes: int) -> Decimal | None:
    if not changes:
        return None
    return (usd / changes).quantize(PER_CHANGE_QUANTUM, rounding=ROUND_HALF_EVEN)


def change_of(record: UsageRecord) -> tuple[str, str] | None:
    """(repository, change) of a record's tags; None without a (valid) change tag."""
    change = record.labels.get("change", "")
    if not change or change == INVALID:
        return None
    return record.labels.get("repository", ""), change


def count_change(books: ChangeBooks, record: UsageRecord) -> None:
    """Add a charged record's cost to its change (no-op without a change tag)."""
    key = change_of(record)
    if key is None or not record.usage_reported:
        return
    entry = books.changes.get(key)
    if entry is None:
        entry = books.changes[key] = ChangeEntry()
    entry.usd += record.cost_usd
    entry.requests += 1
    books.tally(key[0]).add(entry.outcome, record.cost_usd)
    bound_changes(books)


def apply_outcome(books: ChangeBooks, outcome: ChangeOutcome) -> bool:
    """Join an outcome to the change's spend; False if it changes nothing (no spend of this
    team carries the change in this period, or a report as recent was applied already)."""
    entry = books.changes.get((outcome.repository, outcome.change))
    if entry is None:
        return False
    if entry.ended is not None and outcome.time <= entry.ended:
        return False
    if entry.outcome is outcome.outcome:
        return False  # the same outcome again (a CI step re-run): the first time stands
    tally = books.tally(outcome.repository)
    if entry.outcome is None:
        tally.open_usd -= entry.usd
    else:
        tally.add(entry.outcome, -entry.usd, -1)
    tally.add(outcome.outcome, entry.usd, 1)
    entry.outcome, entry.ended = outcome.outcome, outcome.time
    return True


def bound_changes(books: ChangeBooks) -> None:
    """At most MAX_CHANGES entries: changes with an outcome go first (oldest first; their
    spend is in their tally), then the open ones that spent least (their spend stays in
    the repository's openUSD, and an outcome reported for them later finds nothing)."""
    excess = len(books.changes) - MAX_CHANGES
    if excess <= 0:
        return
    ranked = sorted(
        books.changes.items(),
        key=lambda kv: (
            kv[1].outcome is None,
            kv[1].ended.timestamp() if kv[1].ended else 0.0,
            kv[1].usd,
            kv[0],
        ),
    )
    for key, _entry in ranked[:excess]:
        del books.changes[key]


def _parts(repo: RepositoryChanges) -> dict[ChangeResult, ChangeTally]:
    return {
        ChangeResult.MERGED: repo.merged,
        ChangeResult.CLOSED: repo.closed,
        ChangeResult.REVERTED: repo.reverted,
    }


__all__ = [
    "ChangeBooks",
    "ChangeEntry",
    "apply_outcome",
    "bound_changes",
    "change_of",
    "count_change",
    "per_change",
]
