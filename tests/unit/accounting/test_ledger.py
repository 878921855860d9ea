"""Exactly-once aggregation: cursors, exact sums, breakdowns, late records, bounds."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from costwarden.accounting.books import Books, display_usd
from costwarden.accounting.ledger import Entry, apply_entries, prune_cursors
from costwarden.api.accounting import MAX_JOBS, JobOutcome
from costwarden.api.teambudget import TeamBudgetStatus, TokenUsage
from costwarden.api.usage import Endpoint, LoopKind, LoopSignal, Outcome, UsageRecord

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def record(cost: str, *, job: str = "agent-1", model: str = "gpt-4o", time=NOW, **kw):
    return UsageRecord(
        time=time,
        team="ns/b",
        namespace="ns",
        job=job,
        endpoint=Endpoint.CHAT_COMPLETIONS,
        served_model=model,
        tokens=TokenUsage(input=10, output=5, cached_input=2),
        usage_reported=True,
        cost_usd=Decimal(cost),
        outcome=Outcome.OK,
        **kw,
    )


def entries(*costs: str, first: int = 1, **kw):
    return [Entry(seq, record(c, **kw)) for seq, c in enumerate(costs, start=first)]


def fresh() -> Books:
    return Books(start=START, end=END)


def roundtrip(books: Books) -> Books:
    """Write the books into a status and read them back, as the API server would."""
    return Books.read(books.fragment(), START, END)


def test_sums_are_exact_and_spent_usd_is_rounded_down():
    books = fresh()
    apply_entries(books, "gw-1", entries("0.0000089251", "0.0000010749", "1.2345679"), NOW)
    assert books.spent == Decimal("1.2345779")
    fragment = books.fragment()
    assert fragment["spentExactUSD"] == "1.2345779"
    assert fragment["spentUSD"] == "1.234577"  # floor, never up
    assert fragment["tokens"] == {
        "input": 30,
        "output": 15,
        "cachedInput": 6,
        "cacheCreation": 0,
        "cacheCreation1h": 0,
    }
    TeamBudgetStatus.model_validate(fragment)  # the CRD's model accepts it


def test_display_rounding_agrees_with_the_cap_decision():
    cap = Decimal("10")
    for exact in ("9.9999999", "10", "10.0000001"):
        assert (display_usd(Decimal(exact)) >= cap) == (Decimal(exact) >= cap)


def test_a_redelivered_batch_counts_nothing_twice():
    books = fresh()
    batch = entries("0.10", "0.20", "0.30")
    apply_entries(books, "gw-1", batch, NOW)
    again = apply_entries(books, "gw-1", batch, NOW)
    assert again.duplicates == 3
    assert not again.records
    assert books.spent == Decimal("0.60")


def test_cursor_survives_a_round_trip_through_status():
    books = fresh()
    apply_entries(books, "gw-1", entries("0.10", "0.20"), NOW)
    reread = roundtrip(books)
    applied = apply_entries(reread, "gw-1", entries("0.20", "0.30", first=2), NOW)
    assert applied.duplicates == 1
    assert reread.spent == Decimal("0.60")
    assert reread.cursors["gw-1"].seq == 3


def test_sources_are_independent():
    books = fresh()
    apply_entries(books, "gw-1", entries("0.10"), NOW)
    apply_entries(books, "gw-2", entries("0.10"), NOW)
    assert books.spent == Decimal("0.20")


def test_a_partially_applied_batch_resent_applies_only_the_rest():
    """Seq gaps are normal (other teams' records); the cursor is a high-water mark."""
    books = fresh()
    apply_entries(books, "gw-1", [Entry(2, record("0.1")), Entry(7, record("0.2"))], NOW)
    applied = apply_entries(books, "gw-1", [Entry(7, record("0.2")), Entry(9, record("0.4"))], NOW)
    assert applied.duplicates == 1
    assert books.spent == Decimal("0.7")


def test_breakdown_by_model_and_job():
    books = fresh()
    apply_entries(books, "gw", entries("1", "2", model="gpt-4o", job="a"), NOW)
    apply_entries(books, "gw", entries("4", model="mini", job="b", first=3), NOW)
    apply_entries(books, "gw", entries("8", model="mini", job="", first=4), NOW)
    reread = roundtrip(books)
    assert reread.models["gpt-4o"].usd == 3
    assert reread.models["gpt-4o"].requests == 2
    assert reread.models["mini"].usd == 12
    assert reread.jobs[("ns", "a")].spend.usd == 3
    assert reread.jobs[("ns", "b")].spend.tokens == 17
    assert reread.other_jobs == 8  # calls outside any Job


def test_refused_calls_advance_the_cursor_but_cost_nothing():
    books = fresh()
    refused = UsageRecord(
        time=NOW, team="ns/b", endpoint=Endpoint.CHAT_COMPLETIONS, outcome=Outcome.REFUSED
    )
    applied = apply_entries(books, "gw", [Entry(1, refused)], NOW)
    assert len(applied.records) == 1
    assert books.spent == 0
    assert books.cursors["gw"].seq == 1


def test_loop_signals_are_deduplicated_like_records():
    books = fresh()
    signal = LoopSignal(
        time=NOW, team="ns/b", namespace="ns", job="j", loop=LoopKind.IDENTICAL_REQUESTS,
        count=5, action="Suspend",
    )  # fmt: skip
    first = apply_entries(books, "gw", [Entry(1, signal=signal)], NOW)
    second = apply_entries(books, "gw", [Entry(1, signal=signal)], NOW)
    assert len(first.signals) == 1
    assert not second.signals


def test_late_record_of_a_closed_period_lands_in_history():
    books = fresh()
    apply_entries(books, "gw", entries("5"), NOW)
    december = Books.read(books.fragment(), END, datetime(2027, 1, 1, tzinfo=UTC))
    assert december.history[-1].spent_exact_usd == 5
    applied = apply_entries(december, "gw", entries("1", first=2, time=NOW), END)
    assert december.spent == 0
    assert not applied.records
    assert december.history[-1].spent_exact_usd == 6
    ancient = apply_entries(
        december, "gw", entries("1", first=3, time=START - timedelta(days=90)), END
    )
    assert ancient.late == 1
    assert december.late_records == 1


def test_rollover_closes_the_period_once_and_keeps_cursors():
    books = fresh()
    apply_entries(books, "gw", entries("5"), NOW)
    december = Books.read(books.fragment(), END, datetime(2027, 1, 1, tzinfo=UTC))
    again = Books.read(december.fragment(), END, datetime(2027, 1, 1, tzinfo=UTC))
    assert len(again.history) == 1
    assert again.spent == 0
    assert again.cursors["gw"].seq == 1
    assert again.fragment()["history"][0]["spentUSD"] == "5.00"


def test_job_breakdown_is_bounded_and_keeps_totals():
    books = fresh()
    for i in range(MAX_JOBS + 10):
        apply_entries(books, "gw", [Entry(i + 1, record(str(i + 1), job=f"j{i}"))], NOW)
    assert len(books.jobs) == MAX_JOBS
    listed = sum(e.spend.usd for e in books.jobs.values())
    assert listed + books.other_jobs == books.spent
    assert ("ns", "j0") not in books.jobs  # the smallest went to otherUSD


def test_finished_jobs_are_evicted_before_running_ones():
    books = fresh()
    apply_entries(books, "gw", [Entry(1, record("100", job="big-finished"))], NOW)
    books.jobs[("ns", "big-finished")].outcome = JobOutcome.SUCCEEDED
    for i in range(MAX_JOBS):
        apply_entries(books, "gw", [Entry(i + 2, record("1", job=f"j{i}"))], NOW)
    assert ("ns", "big-finished") not in books.jobs
    assert books.other_jobs == 0


def test_idle_cursors_are_pruned():
    books = fresh()
    apply_entries(books, "old", entries("1"), NOW - timedelta(days=40))
    apply_entries(books, "new", entries("1"), NOW)
    assert prune_cursors(books, NOW) == 1
    assert list(books.cursors) == ["new"]
