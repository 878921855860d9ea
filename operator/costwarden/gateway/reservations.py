"""The ledger of reservations in flight in this gateway process (invariant 4b, first part).

A call that passes admission reserves its worst case (policy/reservation.py) before it is
forwarded; what it holds counts against the team, the job and each model it may be served
by until it is settled. Settlement (:meth:`Reservations.settle`) happens exactly once, in
the request handler's ``finally`` (gateway/proxy.py): the metered cost is added to the
settled counters (gateway/limits.py) and the reservation is released in the same
synchronous step, so at no instant is a call counted in neither.

Reserve and settle never await: in one event loop the check and the hold are atomic, so
no number of concurrent calls can reserve the same budget twice.

Holds are keyed by team id, (team, job) and (team, model), never by configuration
revision: a reload does not forget calls in flight. Not here yet (issue #12, second part):
leases of a share of the budget from the operator to each replica, and writing a
reservation to the ledger before forwarding so a killed replica's calls are charged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from costwarden.api.gatewayconfig import ModelRoute, TeamConfig
from costwarden.policy.reservation import WorstCase, worst_cost

_ZERO = Decimal(0)
_K = TypeVar("_K", str, tuple[str, str])


@dataclass(slots=True)
class Held:
    """What calls in flight hold against one limit."""

    cost: Decimal = _ZERO
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class Reservation:
    """One call's hold; released once."""

    team: str
    unit: str
    worst: WorstCase
    models: tuple[tuple[str, Decimal], ...]
    """(model name, worst cost at that model's prices) for each candidate."""
    defaulted: bool = False
    """The call set no output ceiling: the policy default was reserved (and sent)."""
    released: bool = field(default=False)


class Reservations:
    def __init__(self, on_change: Callable[[str, Decimal], None] | None = None) -> None:
        self._teams: dict[str, Held] = {}
        self._jobs: dict[tuple[str, str], Held] = {}
        self._models: dict[tuple[str, str], Held] = {}
        self._on_change = on_change

    def team(self, team_id: str) -> Held:
        return self._teams.get(team_id) or Held()

    def job(self, team_id: str, unit: str) -> Held:
        return self._jobs.get((team_id, unit)) or Held()

    def model(self, team_id: str, model: str) -> Held:
        return self._models.get((team_id, model)) or Held()

    @property
    def in_flight(self) -> int:
        return sum(h.calls for h in self._teams.values())

    def hold(
        self,
        team: TeamConfig,
        unit: str,
        worst: WorstCase,
        routes: tuple[ModelRoute, ...],
        *,
        defaulted: bool = False,
    ) -> Reservation:
        """Hold ``worst`` against the team and the job, and each candidate's own worst cost
        against that model (a fallback may serve the call; each is held until settled)."""
        models = tuple(
            (r.name, worst_cost(worst.input_tokens, worst.output_tokens, r.pricing, worst.tier))
            for r in routes
        )
        reservation = Reservation(team.id, unit, worst, models, defaulted)
        _add(self._teams, team.id, worst.cost, worst, 1)
        _add(self._jobs, (team.id, unit), worst.cost, worst, 1)
        for name, cost in models:
            _add(self._models, (team.id, name), cost, worst, 1)
        if self._on_change is not None:
            self._on_change(team.id, self._teams[team.id].cost)
        return reservation

    def release(self, reservation: Reservation) -> bool:
        """Give the hold back; False (and nothing done) if it was already released."""
        if reservation.released:
            return False
        reservation.released = True
        worst = reservation.worst
        team = reservation.team
        _add(self._teams, team, -worst.cost, worst, -1)
        _add(self._jobs, (team, reservation.unit), -worst.cost, worst, -1)
        for name, cost in reservation.models:
            _add(self._models, (team, name), -cost, worst, -1)
        if self._on_change is not None:
            held = self._teams.get(team)
            self._on_change(team, held.cost if held else _ZERO)
        return True


def _add(table: dict[_K, Held], key: _K, cost: Decimal, worst: WorstCase, sign: int) -> None:
    held = table.get(key)
    if held is None:
        held = table[key] = Held()
    held.cost += cost
    held.input_tokens += sign * worst.input_tokens
    held.output_tokens += sign * worst.output_tokens
    held.calls += sign
    if held.calls == 0:  # nothing in flight: forget the key (bounded by calls in flight)
        del table[key]
