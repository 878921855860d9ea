"""A lease request applied to a team's books (the decision itself: policy/leases.py).

Like usage, a lease changes a team's books in one guarded status write
(controllers/accountant.py), so the operator's invariant ``spent + leases <= cap`` is as
durable as the spend it protects: a new leader reads every outstanding lease from status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from costwarden.accounting.books import Books, Lease
from costwarden.api.accounting import MAX_LEASES
from costwarden.policy.leases import LeaseAsk, LeaseGrant, grant, smaller_need

_ZERO = Decimal(0)


@dataclass(frozen=True)
class LeaseResult:
    grant: LeaseGrant
    applied_seq: int
    """The holder's usage cursor in the same write: the lease is net of everything up to it."""
    period_start: datetime
    reclaimed: list[str] = field(default_factory=list)


def lease_mutation(
    holder: str,
    ask: LeaseAsk,
    cap: Decimal,
    *,
    silent: Callable[[str], bool],
    contended: bool,
) -> Callable[[Books, datetime], LeaseResult]:
    """Reclaim the leases of replicas silent too long, then decide ``holder``'s lease."""

    def mutate(books: Books, now: datetime) -> LeaseResult:
        reclaimed = [h for h in books.leases if h != holder and silent(h)]
        for gone in reclaimed:
            del books.leases[gone]
        current = books.leases.get(holder)
        if current is None and len(books.leases) >= MAX_LEASES:
            refused = LeaseGrant(
                _ZERO,
                ask.need > 0,
                None,
                f"{MAX_LEASES} gateway replicas already hold leases of this TeamBudget; "
                "retry once one lapses",
            )
            return LeaseResult(refused, _applied(books, holder), books.start, reclaimed)
        others = {h: lease.amount for h, lease in books.leases.items() if h != holder}
        decided = grant(
            cap=cap,
            spent=books.spent,
            others=others,
            current=current.amount if current is not None else _ZERO,
            ask=ask,
            contended=contended,
        )
        if decided.amount > 0:
            books.leases[holder] = Lease(decided.amount, min(ask.in_use, decided.amount), now)
        else:
            books.leases.pop(holder, None)
        if decided.trip is not None:
            books.refused_need = smaller_need(books.refused_need, decided.trip)
        return LeaseResult(decided, _applied(books, holder), books.start, reclaimed)

    return mutate


def _applied(books: Books, holder: str) -> int:
    cursor = books.cursors.get(holder)
    return cursor.seq if cursor is not None else 0
