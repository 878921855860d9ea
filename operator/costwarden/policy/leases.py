"""How much of a team's remaining budget each gateway replica may hold (pure decisions).

Reservation (policy/reservation.py) makes one replica unable to overspend; leases make N
replicas unable to, as youtube/doorman leases capacity: the operator lends each replica a
share of what the team has left, the replica reserves its calls against its share with no
network hop per call, and the invariant the operator keeps is

    spent (applied usage) + sum of live leases  <=  hard cap

Money moves from a lease to ``spent`` when the replica's usage is applied (the same
status write, accounting/ledger.py), so the sum never counts a dollar twice and never
forgets one. A replica that stops renewing loses its lease after :data:`LEASE_SECONDS`
(its money returns to the pool). A lease is never shrunk below what the replica reports
in use (calls in flight plus usage metered but not yet applied): that money is committed.

Size: a replica asks for what it has in use, the call waiting and about one renewal
interval of its recent spend; while nobody is short, it is lent at least a share of half of
what is left (``left / (2 * holders)``), so it rides out an outage of the operator or the
API server and asks rarely. Fairness: while a replica is short (it asked and got less than
it needed), every other replica's grant is bounded by a fair share of what is left, and a
renewal gives back all it does not have in use; replicas renew every second meanwhile, so
idle leases flow back to where the calls are within a second or two.

When a call is refused here, the operator also decides whether the cap is *reached*: the
team's hard cap counts as reached when even the call at the policy's default output
ceiling (its ``floor``) cannot fit in ``cap - spent``, i.e. when no lease shuffling could
ever serve it. Calls refused only because other replicas hold leases are retryable and do
not trip the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from costwarden.api.usage import format_exact_usd

LEASE_SECONDS = 30.0
"""How long a lease lives without renewal. Long enough to ride out an operator handover
(Kopf peering moves leadership within ~10 s) and short enough that a dead replica's money
comes back within half a minute."""
RENEW_SECONDS = 10.0
"""How often a replica with a lease renews it (a third of its life: two renewals may fail
before it expires)."""
STARVING_SECONDS = 2 * RENEW_SECONDS
"""How long a replica that was short counts as starving (others' grants are fair-share
bounded meanwhile)."""

_ZERO = Decimal(0)
NANO = Decimal("1e-9")


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """What a replica asks for one team (amounts in USD, exact)."""

    want: Decimal
    """The lease it would like to hold in total (in use + a call waiting + headroom)."""
    need: Decimal = _ZERO
    """The worst case of the call waiting for this answer (0 for a renewal)."""
    floor: Decimal = _ZERO
    """That call's worst case at the policy's default output ceiling (<= need): the
    smallest call that could serve the same work."""
    in_use: Decimal = _ZERO
    """Held by its calls in flight plus metered but not yet applied usage."""
    unapplied: Decimal = _ZERO
    """Of ``in_use``, usage metered but not yet applied: spent, though not yet in ``spent``."""


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    amount: Decimal
    """The replica's lease after this answer (what it may have in use in total)."""
    short: bool
    """The waiting call (``need``) does not fit in the lease."""
    trip: Decimal | None
    """Set when the cap is reached for this call: the floor that no longer fits."""
    message: str = ""


def grant(
    *,
    cap: Decimal,
    spent: Decimal,
    others: Mapping[str, Decimal],
    current: Decimal,
    ask: LeaseAsk,
    contended: bool,
) -> LeaseGrant:
    """The lease a replica holds after asking ``ask`` (its lease now: ``current``).

    ``others`` are the live leases of the team's other replicas; ``contended`` says
    another replica was short recently, so this one gets at most a fair share of what is
    left (but never less than it has in use)."""
    left = max(cap - spent, _ZERO)
    free = left - sum(others.values(), _ZERO)
    holders = len(others) + 1
    wanted = max(ask.want, ask.in_use + ask.need)
    ceiling = free
    if contended:
        ceiling = min(ceiling, _share(left, holders))
        if ask.need <= 0:
            # A renewal while another replica is short gives back everything not in use:
            # even shares can strand money (two replicas each holding half of what one
            # call needs), and a replica with no call waiting needs none.
            wanted = ask.in_use
    else:
        # Uncontended, lend generously (a share of half of what is left): a replica then
        # rides out an operator or API-server outage on its lease, and asks rarely.
        wanted = max(wanted, _share(left, 2 * holders))
    committed = min(current, ask.in_use)
    amount = max(min(wanted, ceiling), committed, _ZERO)
    short = ask.need > 0 and amount - ask.in_use < ask.need
    if not short:
        return LeaseGrant(amount, False, None)
    # Money in flight may still come back (a worst case settles lower); metered usage not
    # yet applied will not: it is spent, so it counts against what is left.
    remaining = max(left - min(ask.unapplied, ask.in_use), _ZERO)
    trip = ask.floor if ask.floor > remaining else None
    if trip is not None:
        message = (
            f"the hard cap is reached: {format_exact_usd(remaining)} USD is left of the "
            f"{format_exact_usd(cap)} USD cap, less than this call's worst case even at the "
            f"policy's default output ceiling ({format_exact_usd(ask.floor)} USD)"
        )
    else:
        lent = sum(others.values(), _ZERO)
        message = (
            f"{format_exact_usd(max(amount - ask.in_use, _ZERO))} USD of this gateway's lease is "
            f"free for a call whose worst case is {format_exact_usd(ask.need)} USD; "
            f"{format_exact_usd(left)} USD is left of the {format_exact_usd(cap)} USD cap and "
            f"other gateway replicas hold {format_exact_usd(lent)} "
            "USD of it in leases (returned as they renew): retry"
        )
    return LeaseGrant(amount, True, trip, message)


def _share(amount: Decimal, parts: int) -> Decimal:
    """``amount / parts`` rounded down to a nano-dollar (a lease never rounds up)."""
    return (amount / parts).quantize(NANO, rounding=ROUND_FLOOR)


def smaller_need(current: Decimal | None, new: Decimal | None) -> Decimal | None:
    """The period's refused need is the smallest floor refused (a smaller call not fitting
    is the stronger evidence that the budget is spent)."""
    if new is None:
        return current
    return new if current is None else min(current, new)


def wanted_lease(*, in_use: Decimal, need: Decimal, recent: Decimal) -> Decimal:
    """What a replica asks to hold: what it has in use, the call waiting, and headroom for
    the next renewal interval (its spend over the last interval, at least the call again),
    so a steady load asks about once per renewal and an idle replica gives money back."""
    return in_use + need + max(recent, need)
