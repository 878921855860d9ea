"""This replica's leases of each team's budget, asked of the operator (policy/leases.py).

With the operator behind it (``--report-to``), a gateway replica never spends a team's
budget the operator has not lent it. For each team whose hard cap blocks, it holds a
*lease*: an amount the operator has set aside for it. What the replica may still reserve is

    available = lease - pending - held

- ``lease`` is the operator's figure as of ``applied_seq``, the highest of this replica's
  usage entries the operator had applied when it answered (applying an entry moves its
  cost out of the lease, in the operator's same write);
- ``pending`` is the cost of this replica's entries after ``applied_seq`` (metered here,
  not yet applied there);
- ``held`` is what its calls in flight have reserved (gateway/reservations.py).

A call whose worst case exceeds ``available`` waits for one round trip to the operator
(one request per team at a time: concurrent calls share it), which grants more if the
team has it, and the call is refused if not (429 budget_reservation_failed). Leases are
renewed every ``RENEW_SECONDS`` (returning what a quiet replica does not need) and lapse
after ``LEASE_SECONDS`` without an answer: a replica cut off from the operator stops
spending within that time rather than spend money the operator may have lent elsewhere.
An answer that says the operator cannot decide now (503: not the leader, or the API server
is down) keeps the lease good: the operator reclaims nothing while it cannot write, so a
control-plane outage costs callers nothing until the lease itself is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from costwarden.api.usage import format_exact_usd
from costwarden.policy.leases import LEASE_SECONDS, RENEW_SECONDS, wanted_lease

log = logging.getLogger("costwarden.gateway.leases")

_ZERO = Decimal(0)
MAX_PENDING = 200_000
"""Entries remembered per team between two answers (a renewal trims them)."""
LAPSE_MARGIN = 2.0
"""A lease is treated as lapsed this long before the operator would reclaim it (clocks
are not compared: both count from the request, the gateway from before it was sent)."""
ASK_TIMEOUT = 5.0
CONTENDED_RENEW = 1.0

Post = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]
"""POST a JSON body to a path of the operator; (status, body)."""


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    granted: bool
    """The call waiting fits in this replica's lease now."""
    final: bool = False
    """The operator says the cap is reached for it: retrying cannot help."""
    message: str = ""


@dataclass
class TeamLease:
    amount: Decimal = _ZERO
    applied_seq: int = 0
    period_start: datetime | None = None
    lapses_at: float = 0.0
    renewed_at: float = 0.0
    renew_every: float = RENEW_SECONDS
    pending: deque[tuple[int, Decimal, datetime]] = field(default_factory=deque)
    pending_cost: Decimal = _ZERO
    recent: deque[tuple[float, Decimal]] = field(default_factory=deque)
    asking: asyncio.Future[LeaseAnswer] | None = None
    message: str = ""
    final: bool = False

    def trim(self) -> None:
        """Forget pending entries the operator has applied (or of an earlier period)."""
        while self.pending and (
            self.pending[0][0] <= self.applied_seq
            or (self.period_start is not None and self.pending[0][2] < self.period_start)
        ):
            _, cost, _ = self.pending.popleft()
            self.pending_cost -= cost
        if not self.pending:
            self.pending_cost = _ZERO


class Leases:
    def __init__(
        self,
        post: Post,
        source: Callable[[], str],
        held: Callable[[str], Decimal],
        clock: Callable[[], float] = time.monotonic,
        on_lease: Callable[[str, Decimal], None] | None = None,
    ) -> None:
        self._on_lease = on_lease
        self._post = post
        self._source = source
        self._held = held
        self._clock = clock
        self._teams: dict[str, TeamLease] = {}
        self.asks = 0
        self.failures = 0

    # -- the request path (no awaiting unless the lease is short) -----------------------

    def available(self, team: str) -> Decimal:
        lease = self._teams.get(team)
        if lease is None or self._clock() >= lease.lapses_at:
            return _ZERO
        return lease.amount - lease.pending_cost - self._held(team)

    def leased(self, team: str) -> Decimal:
        lease = self._teams.get(team)
        return lease.amount if lease is not None else _ZERO

    async def ask(self, team: str, need: Decimal, floor: Decimal) -> LeaseAnswer:
        """Ask the operator for enough to hold ``need`` more (one request per team at a
        time; a caller arriving meanwhile waits for that answer, then re-checks)."""
        lease = self._teams.setdefault(team, TeamLease())
        if lease.asking is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.asking)
            if self.available(team) >= need:
                return LeaseAnswer(True)
        return await self._exchange(team, need, floor)

    def note(self, team: str, seq: int, cost: Decimal, when: datetime) -> None:
        """A usage entry of ``team`` was numbered ``seq`` and costs ``cost``."""
        if cost <= 0:
            return
        lease = self._teams.get(team)
        if lease is None or seq <= lease.applied_seq:
            return  # no lease for this team, or the operator already drew it
        if len(lease.pending) >= MAX_PENDING:
            _, old, _ = lease.pending.popleft()
            lease.pending_cost -= old
        lease.pending.append((seq, cost, when))
        lease.pending_cost += cost
        lease.recent.append((self._clock(), cost))

    def restore(self, entries: Iterable[tuple[str, int, Decimal, datetime]]) -> None:
        """After a restart: usage entries still unapplied, read back from the ledger."""
        for team, seq, cost, when in entries:
            lease = self._teams.setdefault(team, TeamLease())
            lease.pending.append((seq, cost, when))
            lease.pending_cost += cost

    # -- renewal -------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew every lease held every RENEW_SECONDS (and give back what is idle)."""
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for team, lease in list(self._teams.items()):
                if lease.amount <= 0 and not lease.pending:
                    continue
                if now - lease.renewed_at >= lease.renew_every and lease.asking is None:
                    with contextlib.suppress(Exception):
                        await self._exchange(team, _ZERO, _ZERO)

    async def _exchange(self, team: str, need: Decimal, floor: Decimal) -> LeaseAnswer:
        lease = self._teams.setdefault(team, TeamLease())
        future: asyncio.Future[LeaseAnswer] = asyncio.get_running_loop().create_future()
        lease.asking = future
        try:
            answer = await self._ask_operator(team, lease, need, floor)
            future.set_result(answer)
            return answer
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-check, nobody else must
            raise
        finally:
            lease.asking = None

    async def _ask_operator(
        self, team: str, lease: TeamLease, need: Decimal, floor: Decimal
    ) -> LeaseAnswer:
        now = self._clock()
        while lease.recent and now - lease.recent[0][0] > RENEW_SECONDS:
            lease.recent.popleft()
        in_use = lease.pending_cost + self._held(team)
        recent = sum((cost for _, cost in lease.recent), _ZERO)
        want = wanted_lease(in_use=in_use, need=need, recent=recent)
        body = orjson.dumps(
            {
                "source": self._source(),
                "teams": [
                    {
                        "team": team,
                        "want": format_exact_usd(want),
                        "need": format_exact_usd(need),
                        "floor": format_exact_usd(floor),
                        "inUse": format_exact_usd(in_use),
                        "unapplied": format_exact_usd(lease.pending_cost),
                    }
                ],
            }
        )
        self.asks += 1
        try:
            status, raw = await asyncio.wait_for(self._post("/v1/leases", body), ASK_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            return self._failed(lease, f"the operator could not be asked for budget: {exc}")
        except Exception as exc:  # aiohttp.ClientError and kin: never crash a call
            return self._failed(lease, f"the operator could not be asked for budget: {exc}")
        if status == 503 and lease.amount > 0:
            # The operator is up but cannot decide now (not the leader, or the API server
            # is down): it reclaims nothing while it cannot write, so the lease stays good.
            lease.lapses_at = max(lease.lapses_at, now + LEASE_SECONDS - LAPSE_MARGIN)
            lease.renewed_at = now
        if status != 200:
            return self._failed(lease, f"the operator answered HTTP {status}: {raw[:200]!r}")
        try:
            answer = _team_answer(orjson.loads(raw), team)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, InvalidOperation) as exc:
            return self._failed(lease, f"the operator's lease answer was malformed: {exc}")
        lease.amount = answer["amount"]
        lease.applied_seq = max(lease.applied_seq, answer["applied_seq"])
        lease.period_start = answer["period_start"]
        seconds = max(min(answer["seconds"], LEASE_SECONDS), 3 * LAPSE_MARGIN)
        lease.lapses_at = now + seconds - LAPSE_MARGIN
        # While some replica is short, renew every second: what this one does not use
        # goes back to the pool quickly (policy/leases.py).
        lease.renew_every = (
            CONTENDED_RENEW if answer["contended"] else min(RENEW_SECONDS, seconds / 3)
        )
        lease.renewed_at = now
        lease.message = answer["message"]
        lease.final = answer["final"]
        lease.trim()
        if self._on_lease is not None:
            self._on_lease(team, lease.amount)
        fits = self.available(team) >= need
        if fits or need <= 0:
            return LeaseAnswer(True)
        return LeaseAnswer(False, answer["final"], answer["message"])

    def _failed(self, lease: TeamLease, message: str) -> LeaseAnswer:
        self.failures += 1
        log.warning("lease: %s", message)
        return LeaseAnswer(False, False, message)


def _team_answer(body: Any, team: str) -> dict[str, Any]:
    for entry in body["teams"]:
        if entry["team"] != team:
            continue
        amount = Decimal(str(entry["leasedUSD"]))
        if not amount.is_finite() or amount < 0:
            raise ValueError("leasedUSD must be a finite, non-negative amount")
        start = entry.get("periodStart")
        return {
            "amount": amount,
            "applied_seq": int(entry.get("appliedSeq", 0)),
            "period_start": datetime.fromisoformat(start.replace("Z", "+00:00"))
            if isinstance(start, str)
            else None,
            "seconds": float(entry.get("expiresInSeconds", LEASE_SECONDS)),
            "message": str(entry.get("message", ""))[:1000],
            "final": bool(entry.get("final", False)),
            "contended": bool(entry.get("contended", False)),
        }
    raise KeyError(f"no answer for team {team}")
