"""Cost per result and period rollover."""

from datetime import UTC, datetime
from decimal import Decimal

from costwarden.accounting.books import Books
from costwarden.accounting.ledger import Entry, apply_entries
from costwarden.accounting.periods import rollover_fragment
from costwarden.accounting.results import count_finish, job_outcome
from costwarden.api.accounting import JobOutcome
from tests.unit.accounting.test_ledger import END, NOW, START, record


def job(conditions=(), annotations=None, labels=None):
    return {
        "metadata": {"name": "j", "namespace": "ns", "annotations": annotations or {},
                     "labels": labels or {}},
        "status": {"conditions": [
            {"type": t, "status": "True", "lastTransitionTime": "2026-11-25T12:00:00Z"}
            for t in conditions
        ]},
    }  # fmt: skip


def test_outcomes_of_finished_jobs():
    assert job_outcome(job(["Complete"]))[0] is JobOutcome.SUCCEEDED
    assert job_outcome(job(["Failed"]))[0] is JobOutcome.FAILED
    stopped = job(["Failed"], annotations={"costwarden.io/stopped-by": "ns/b"})
    assert job_outcome(stopped)[0] is JobOutcome.STOPPED_BY_COSTWARDEN
    assert job_outcome(job()) is None
    suspended = job(labels={"costwarden.io/suspended-by": "uid"})
    assert job_outcome(suspended, deleted=True)[0] is JobOutcome.STOPPED_BY_COSTWARDEN
    assert job_outcome(job(), deleted=True) is None  # deleted by its owner: not a result


def test_cost_per_succeeded_job_and_waste():
    books = Books(start=START, end=END)
    for seq, (name, cost) in enumerate([("a", "3"), ("b", "5"), ("c", "7"), ("d", "11")], 1):
        apply_entries(books, "gw", [Entry(seq, record(cost, job=name))], NOW)
    assert count_finish(books, "ns", "a", JobOutcome.SUCCEEDED, NOW)
    assert count_finish(books, "ns", "b", JobOutcome.SUCCEEDED, NOW)
    assert count_finish(books, "ns", "c", JobOutcome.FAILED, NOW)
    assert count_finish(books, "ns", "d", JobOutcome.STOPPED_BY_COSTWARDEN, NOW)
    results = books.results()
    assert results.succeeded.jobs == 2
    assert results.succeeded.spent_usd == 8
    assert results.cost_per_succeeded_job_usd == Decimal("4.000000")
    assert results.wasted_usd == 18


def test_a_finished_job_is_counted_once_even_after_a_relist():
    books = Books(start=START, end=END)
    apply_entries(books, "gw", [Entry(1, record("3", job="a"))], NOW)
    assert count_finish(books, "ns", "a", JobOutcome.SUCCEEDED, NOW)
    reread = Books.read(books.fragment(), START, END)
    assert not count_finish(reread, "ns", "a", JobOutcome.SUCCEEDED, NOW)
    assert reread.results().succeeded.jobs == 1


def test_usage_arriving_after_the_finish_joins_the_outcome():
    books = Books(start=START, end=END)
    apply_entries(books, "gw", [Entry(1, record("3", job="a"))], NOW)
    count_finish(books, "ns", "a", JobOutcome.FAILED, NOW)
    apply_entries(books, "gw", [Entry(2, record("2", job="a"))], NOW)
    assert books.results().failed.spent_usd == 5


def test_jobs_without_spend_still_count_as_results():
    books = Books(start=START, end=END)
    assert count_finish(books, "ns", "quiet", JobOutcome.SUCCEEDED, NOW)
    assert books.results().succeeded.jobs == 1
    assert books.results().cost_per_succeeded_job_usd == 0


def test_finishes_outside_the_period_are_not_counted():
    books = Books(start=START, end=END)
    assert not count_finish(books, "ns", "a", JobOutcome.SUCCEEDED, END)


def test_rollover_fragment_opens_the_first_period():
    fragment = rollover_fragment({}, START, END)
    assert fragment["currentPeriod"] == {
        "start": "2026-11-01T00:00:00Z",
        "end": "2026-12-01T00:00:00Z",
    }
    assert fragment["spentUSD"] == "0.00"
    assert fragment["history"] == []


def test_rollover_fragment_is_empty_inside_the_period():
    status = rollover_fragment({}, START, END)
    assert rollover_fragment(status, START, END) == {}


def test_rollover_closes_into_history_and_resets_results():
    books = Books(start=START, end=END)
    apply_entries(books, "gw", [Entry(1, record("3", job="a"))], NOW)
    count_finish(books, "ns", "a", JobOutcome.SUCCEEDED, NOW)
    december = rollover_fragment(books.fragment(), END, datetime(2027, 1, 1, tzinfo=UTC))
    assert december["spentExactUSD"] == "0"
    assert december["results"]["succeeded"] == {"jobs": 0, "spentUSD": "0"}
    assert december["results"]["costPerSucceededJobUSD"] is None  # merge patch removes it
    closed = december["history"][0]
    assert closed["spentUSD"] == "3.00"
    assert closed["results"]["costPerSucceededJobUSD"] == "3"
    assert december["ingestion"]["cursors"][0]["seq"] == 1


def test_a_writer_with_a_lagging_clock_never_rolls_back():
    december = rollover_fragment({}, END, datetime(2027, 1, 1, tzinfo=UTC))
    assert rollover_fragment(december, START, END) == {}
