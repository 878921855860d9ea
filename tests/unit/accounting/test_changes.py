"""Cost per result beyond Jobs (pure): spend tagged with a change, joined to its outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from costwarden.accounting.books import Books
from costwarden.accounting.changes import ChangeBooks, apply_outcome, per_change
from costwarden.accounting.ledger import Entry, apply_entries
from costwarden.api.accounting import MAX_CHANGES
from costwarden.api.results import ChangeOutcome, ChangeResult
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.policy.attribution import INVALID

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def record(cost: str, repository: str = "acme/api", change: str = "1", **kw) -> UsageRecord:
    labels = {"change": change, **({"repository": repository} if repository else {})}
    return UsageRecord(
        time=NOW, team="t/b", namespace="t", endpoint=Endpoint.CHAT_COMPLETIONS,
        served_model="mini", tokens=TokenUsage(input=1), usage_reported=True,
        cost_usd=Decimal(cost), outcome=Outcome.OK, labels=labels, **kw,
    )  # fmt: skip


def outcome(change: str, result: ChangeResult, minutes: int = 0, repo: str = "acme/api"):
    return ChangeOutcome(repository=repo, change=change, outcome=result,
                         time=NOW + timedelta(minutes=minutes), source="test")  # fmt: skip


def spend(books: Books, *records: UsageRecord) -> None:
    entries = [Entry(seq, r) for seq, r in enumerate(records, start=len(books.cursors) + 1)]
    apply_entries(books, f"src{len(books.cursors)}", entries, NOW)


def test_cost_per_merged_change_and_spend_that_never_merged_by_repository():
    books = Books(START, END)
    spend(books, record("0.10", change="1"), record("0.05", change="1"), record("0.30", change="2"),
          record("0.07", change="3"), record("1.00", "acme/web", "9"),
          record("0.50", change="", repository="acme/api"))  # fmt: skip
    for change, result in (("1", ChangeResult.MERGED), ("2", ChangeResult.MERGED),
                           ("3", ChangeResult.CLOSED)):  # fmt: skip
        assert apply_outcome(books.changes, outcome(change, result))
    status = books.changes.status()
    api = next(r for r in status.by_repository if r.repository == "acme/api")
    assert (api.merged.changes, api.merged.spent_usd) == (2, Decimal("0.45"))
    assert api.cost_per_merged_change_usd == Decimal("0.225")
    assert (api.closed.changes, api.closed.spent_usd) == (1, Decimal("0.07"))
    assert api.open_usd == 0
    web = next(r for r in status.by_repository if r.repository == "acme/web")
    assert web.open_usd == Decimal("1.00")
    assert web.cost_per_merged_change_usd is None
    assert status.never_merged_usd == Decimal("0.07")
    assert status.cost_per_merged_change_usd == Decimal("0.225")
    assert books.spent == Decimal("2.02"), "untagged spend is spend all the same"


def test_a_report_is_applied_once_and_a_later_one_moves_the_change():
    books = Books(START, END)
    spend(books, record("0.20", change="1"))
    assert apply_outcome(books.changes, outcome("1", ChangeResult.MERGED))
    assert not apply_outcome(books.changes, outcome("1", ChangeResult.MERGED)), "redelivery"
    assert not apply_outcome(books.changes, outcome("1", ChangeResult.CLOSED, -5)), "older"
    assert apply_outcome(books.changes, outcome("1", ChangeResult.REVERTED, 30))
    api = books.changes.status().by_repository[0]
    assert (api.merged.changes, api.merged.spent_usd) == (0, 0)
    assert (api.reverted.changes, api.reverted.spent_usd) == (1, Decimal("0.20"))
    # Spend after the outcome joins the outcome's tally.
    spend(books, record("0.05", change="1"))
    api = books.changes.status().by_repository[0]
    assert api.reverted.spent_usd == Decimal("0.25")
    assert api.open_usd == 0


def test_an_outcome_without_spend_of_the_team_changes_nothing():
    books = Books(START, END)
    spend(books, record("0.20", change="1"))
    assert not apply_outcome(books.changes, outcome("2", ChangeResult.MERGED))
    assert not apply_outcome(books.changes, outcome("1", ChangeResult.MERGED, repo="acme/web"))
    assert books.changes.status().by_repository[0].open_usd == Decimal("0.20")


def test_invalid_or_absent_change_tags_join_nothing():
    books = Books(START, END)
    spend(books, record("0.20", change=INVALID), record("0.10", change=""))
    assert books.changes.changes == {}


def test_the_books_round_trip_through_status():
    books = Books(START, END)
    spend(books, record("0.000000001", change="1"), record("0.3", change="2"))
    apply_outcome(books.changes, outcome("1", ChangeResult.MERGED))
    fragment = books.fragment()
    again = Books.read(fragment, START, END)
    assert again.changes.status() == books.changes.status()
    assert fragment["changes"]["byRepository"][0]["merged"]["spentUSD"] == "0.000000001"


def test_changes_are_bounded_and_finished_ones_go_first():
    books = Books(START, END)
    spend(books, record("0.5", change="done"))
    apply_outcome(books.changes, outcome("done", ChangeResult.MERGED))
    spend(books, *(record("0.01", change=f"c{i}") for i in range(MAX_CHANGES)))
    assert len(books.changes.changes) == MAX_CHANGES
    assert ("acme/api", "done") not in books.changes.changes
    api = books.changes.status().by_repository[0]
    assert api.merged.spent_usd == Decimal("0.5"), "its spend stays in the tally"
    assert api.open_usd == Decimal("0.01") * MAX_CHANGES


def test_repositories_are_bounded():
    books = ChangeBooks()
    for i in range(40):
        books.tally(f"org/r{i}")
    assert len(books.repositories) == 32
    assert "_other" in books.repositories


def test_cost_per_change_has_eighteen_decimals():
    assert per_change(Decimal(1), 3) == Decimal("0.333333333333333333")
    assert per_change(Decimal(1), 0) is None


def test_a_closed_period_keeps_the_tallies_by_repository_without_the_change_list():
    books = Books(START, END)
    spend(books, record("0.10", change="1"), record("0.30", change="2"))
    apply_outcome(books.changes, outcome("1", ChangeResult.MERGED))
    following = Books.read(books.fragment(), END, datetime(2027, 1, 1, tzinfo=UTC))
    assert following.changes.changes == {}, "the new period starts without changes"
    closed = following.history[-1].changes
    assert closed is not None
    assert closed.changes == []
    api = closed.by_repository[0]
    assert (api.merged.changes, api.merged.spent_usd, api.open_usd) == (
        1, Decimal("0.10"), Decimal("0.30"),
    )  # fmt: skip
    assert following.fragment()["history"][-1]["changes"]["costPerMergedChangeUSD"] == "0.1"
