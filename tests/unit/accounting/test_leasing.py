"""Leases in a team's books: granted, drawn by applied usage, reclaimed, persisted, and the
cap reached by a refused call (accounting/leasing.py, accounting/ledger.py, policy/caps.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from costwarden.accounting.books import Books, Lease
from costwarden.accounting.leasing import lease_mutation
from costwarden.accounting.ledger import apply_entries
from costwarden.api.conditions import Reason
from costwarden.api.teambudget import BudgetPhase, TokenUsage
from costwarden.policy.caps import evaluate_caps
from costwarden.policy.leases import LeaseAsk
from tests.unit.accounting.test_ledger import NOW, entries, fresh, roundtrip

D = Decimal
CAP = D(10)


def ask(books: Books, holder: str, *, silent=lambda h: False, contended=False, **amounts: str):
    mutate = lease_mutation(
        holder,
        LeaseAsk(**{k: D(v) for k, v in amounts.items()}),
        CAP,
        silent=silent,
        contended=contended,
    )
    return mutate(books, NOW)


def test_a_grant_is_kept_in_the_books_and_survives_a_status_round_trip():
    books = fresh()
    result = ask(books, "sa:gw#a", want="1", need="0.1", floor="0.1")
    assert result.grant.amount == D(5)
    assert books.leases["sa:gw#a"].amount == D(5)
    again = roundtrip(books)
    assert again.leases["sa:gw#a"].amount == D(5)
    status = books.fragment()["leases"]
    assert status["leasedUSD"] == "5"
    assert status["holders"][0]["holder"] == "sa:gw#a"


def test_applied_usage_moves_its_cost_from_the_reporters_lease_to_spend():
    books = fresh()
    ask(books, "sa:gw#a", want="1")
    apply_entries(books, "sa:gw#a", entries("0.25", "0.5"), NOW)
    assert books.spent == D("0.75")
    assert books.leases["sa:gw#a"].amount == D("4.25")
    # spent + leases stays what it was: no dollar counted twice or forgotten.
    assert books.spent + books.leases["sa:gw#a"].amount == D(5)


def test_another_reporters_usage_does_not_draw_from_this_lease():
    books = fresh()
    ask(books, "sa:gw#a", want="1")
    apply_entries(books, "sa:gw#b", entries("0.25"), NOW)
    assert books.leases["sa:gw#a"].amount == D(5)


def test_the_result_carries_the_holders_cursor_so_the_lease_is_net_of_it():
    books = fresh()
    apply_entries(books, "sa:gw#a", entries("0.25", "0.5", first=1), NOW)
    result = ask(books, "sa:gw#a", want="1")
    assert result.applied_seq == 2


def test_silent_holders_are_reclaimed_before_deciding():
    books = fresh()
    books.leases["sa:gw#dead"] = Lease(D(9), D(0), NOW)
    short = ask(books, "sa:gw#a", want="2", need="2", floor="2")
    assert short.grant.short
    result = ask(books, "sa:gw#a", want="2", need="2", floor="2", silent=lambda h: True)
    assert result.reclaimed == ["sa:gw#dead"]
    assert "sa:gw#dead" not in books.leases
    assert not result.grant.short


def test_a_trip_sets_the_refused_need_and_the_cap_counts_as_reached():
    books = fresh()
    books.spent = D("9.97")
    result = ask(books, "sa:gw#a", want="0.2", need="0.1", floor="0.05")
    assert result.grant.trip == D("0.05")
    assert books.refused_need == D("0.05")
    verdict = evaluate_caps(
        spent_usd=books.spent,
        tokens=TokenUsage(),
        hard_cap_usd=CAP,
        soft_limit_usd=D(8),
        token_caps=None,
        refused_need_usd=books.refused_need,
    )
    assert verdict.phase is BudgetPhase.EXHAUSTED
    assert verdict.reason is Reason.CALL_EXCEEDS_REMAINING
    # Raising the cap so that the call fits lifts it, with no reset needed.
    raised = evaluate_caps(
        spent_usd=books.spent,
        tokens=TokenUsage(),
        hard_cap_usd=D(20),
        soft_limit_usd=D(16),
        token_caps=None,
        refused_need_usd=books.refused_need,
    )
    assert raised.phase is BudgetPhase.ACTIVE


def test_leases_carry_into_the_next_period_but_the_refusal_does_not():
    books = fresh()
    ask(books, "sa:gw#a", want="1")
    books.spent = D("9.99")
    ask(books, "sa:gw#b", want="1", need="1", floor="1")
    assert books.refused_need == D(1)
    december = datetime(2026, 12, 1, tzinfo=UTC)
    following = Books.read(books.fragment(), december, datetime(2027, 1, 1, tzinfo=UTC))
    assert following.spent == 0
    assert following.leases["sa:gw#a"].amount == D(5)
    assert following.refused_need is None


def test_too_many_holders_are_refused_a_new_lease():
    books = fresh()
    for n in range(128):
        books.leases[f"pod:ns/p{n}/u#s"] = Lease(D(0), D(0), NOW)
    result = ask(books, "pod:ns/new/u#s", want="1", need="0.1", floor="0.1")
    assert result.grant.short
    assert result.grant.trip is None
    assert "pod:ns/new/u#s" not in books.leases


def test_the_reconcilers_rounded_spend_and_the_exact_spend_agree_on_the_trip():
    """status.spentUSD is rounded down to micro-dollars; the accounting reads the exact
    spend. A refused call must put both in Exhausted (else the enforcer, reading one,
    resumes what the other suspended)."""
    exact, rounded, need = D("0.0000708"), D("0.00007"), D("0.00003")
    verdicts = [
        evaluate_caps(
            spent_usd=spent, tokens=TokenUsage(), hard_cap_usd=D("0.0001"),
            soft_limit_usd=D("0.0001"), token_caps=None, refused_need_usd=need,
        ).phase
        for spent in (exact, rounded)
    ]  # fmt: skip
    assert verdicts == [BudgetPhase.EXHAUSTED, BudgetPhase.EXHAUSTED]
