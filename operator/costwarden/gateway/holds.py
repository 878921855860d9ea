"""The hold journal: every reserved call written down before it is forwarded, so that a
gateway killed with calls in flight charges them at their reservation when it restarts
(issue #12: "reserved-but-unsettled calls of a crashed replica are charged at their
reservation, never lost"; docs/ledger.md, "Calls in flight at a kill").

With ``--ledger PATH`` the journal is ``PATH.holds.<n>`` next to the ledger: numbered
segments, one written at a time. Two kinds of line, each written with one ``write(2)`` on
an ``O_APPEND`` descriptor (the ledger's durability class: in the page cache at once, so a
killed process loses none; fsync'd within :data:`FLUSH_SECONDS` with
``--ledger-fsync batch``):

- ``{"kind":"Hold","reservedUSD":…,"record":{…}}`` before the call is forwarded. ``record``
  is the call's usage record *as if it were interrupted*: charged at its reservation (see
  :func:`charge_at_reservation`), outcome ``UpstreamError``, reason
  :data:`INTERRUPTED_REASON`, HTTP status 0 (the client got no answer).
- ``{"kind":"Settled","id":…}`` once the call settled and its own usage record is in the
  ledger file (written first, in the same synchronous step; while the sink keeps lines in
  memory because the volume refuses them, the settlement waits until they are written).

On start, before the gateway serves, :meth:`HoldJournal.recover` reads every segment and
charges each hold without a settlement whose id is not in the ledger either: its record
goes through the sink once (a numbered ledger line, delivered like any other), the ledger
is fsync'd, and only then a new empty segment is started and the old ones removed. A
restart during recovery finds the records it already wrote in the ledger (same id) and
does not charge them again; a hold whose own record reached the ledger before the kill is
not charged either.

Compaction: once the segment passes :data:`COMPACT_BYTES` and twice what is still held, a
new segment is started with the holds of the calls still in flight, and the old one is
unlinked. No rename over an existing file and no fsync on the event loop (a rename over
the old file, with or without an fsync, stalled the event loop for up to 25 ms, p99 8 ms,
measured on ext4 on a loaded machine; a new segment: p99 0.3 ms): a killed
process leaves the old segment, the new one or both, and recovery reads their union. The
journal stays under 1 MiB plus the holds of the calls in flight (about 700 bytes each),
bounded on its own, not counted in ``--ledger-max-bytes``.

What a kill -9 still costs: a call killed after its reservation but before its request
left is charged too (the gateway cannot know it was not sent); the charge is the worst
case, not what the provider billed. What is still lost: a ledger whose volume is gone
(the pod deleted with its emptyDir) takes its journal with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import (
    RECORD_API_VERSION,
    Outcome,
    UsageRecord,
    UsageSink,
    format_exact_usd,
)
from costwarden.gateway.call import MAX_ROUTE_REASON, MAX_SENSITIVITY, MAX_TASK
from costwarden.gateway.call import _tags as call_tags  # the ledger's own record's tags
from costwarden.gateway.sinks import FsyncPolicy
from costwarden.policy.reservation import WorstCase, billable_tiers, worst_cost
from costwarden.supervision import Supervisor

if TYPE_CHECKING:
    from costwarden.gateway.call import Call
    from costwarden.gateway.metrics import GatewayMetrics

log = logging.getLogger("costwarden.gateway.holds")

SUFFIX = ".holds"
COMPACT_BYTES = 1024 * 1024
FLUSH_SECONDS = 0.2
INTERRUPTED_REASON = "gateway_interrupted; charged_reservation"
"""The reason of a record charged at recovery. It ends like the reason of a call charged
its reservation in the same process (gateway/proxy.py), so consumers that look for
``charged_reservation`` (forward.charged_without_usage) see both."""
LOGGED_CALLS = 20
"""Interrupted calls logged one by one at recovery; the rest are in the summary line."""
_ID = re.compile(rb'"id":"([^"]{1,64})"')


def journal_path(ledger: Path) -> Path:
    """The journal's base name; its segments are ``<base>.<n>`` (:func:`segments`)."""
    return ledger.with_name(ledger.name + SUFFIX)


def segments(base: Path) -> list[Path]:
    """The journal's segment files, oldest first."""
    numbered = []
    for path in base.parent.glob(base.name + ".*"):
        number = path.name[len(base.name) + 1 :]
        if number.isdigit():
            numbered.append((int(number), path))
    return [path for _, path in sorted(numbered)]


def charge_at_reservation(
    worst: WorstCase,
    routes: Iterable[ModelRoute],
    costs: Iterable[tuple[str, Decimal]] = (),
) -> tuple[ModelRoute, TokenUsage]:
    """The candidate and tokens that price to exactly the reservation.

    The reservation is the worst case at the dearest candidate's prices, its input at that
    model's dearest input rate, in the dearest service tier the call may be billed at
    (policy/reservation.py). The charge names that candidate as the served model, that tier
    as its tier (the record's serviceTier), and puts the input tokens in the field priced at
    that rate (plain input unless cached reads or cache writes cost more), so ``call_cost``
    of the record, which the operator recomputes from the policy's prices, is the
    reservation itself. ``costs``: each candidate's worst cost if known
    (``Reservation.models``), which spares computing them again on the request path."""
    route, _tier, fields = _charge(worst, tuple(routes), tuple(costs))
    return route, _tokens(fields, worst)


def _tokens(fields: tuple[int, int, int, int], worst: WorstCase) -> TokenUsage:
    fresh, cached, written, written_1h = fields
    return TokenUsage.model_construct(
        input=fresh,
        cached_input=cached,
        cache_creation=written,
        cache_creation_1h=written_1h,
        output=worst.output_tokens,
    )


def _charge(
    worst: WorstCase, routes: tuple[ModelRoute, ...], costs: tuple[tuple[str, Decimal], ...]
) -> tuple[ModelRoute, str, tuple[int, int, int, int]]:
    """(route, tier, (input, cachedInput, cacheCreation, cacheCreation1h))."""
    dearest = next((name for name, cost in costs if cost == worst.cost), None)
    route = next((r for r in routes if r.name == dearest), None)
    if route is None:
        route = next(
            (r for r in routes
             if worst_cost(worst.input_tokens, worst.output_tokens, r.pricing, worst.tier)
             == worst.cost),
            routes[0],
        )  # fmt: skip
    pricing = route.pricing
    prompt = worst.input_tokens

    def cost_in(tier: str) -> Decimal:
        rates = pricing.rates(tier)
        return prompt * rates.dearest_input() + worst.output_tokens * rates.output

    tier = max(billable_tiers(pricing, worst.tier), key=cost_in)
    rates = pricing.rates(tier)
    rate = rates.dearest_input()
    if rate == rates.input:
        return route, tier, (prompt, 0, 0, 0)
    if rate == rates.cache_write:
        return route, tier, (0, 0, prompt, 0)
    if rate == rates.cache_write_1h:
        return route, tier, (0, 0, 0, prompt)
    return route, tier, (0, prompt, 0, 0)


class HoldJournal:
    """The journal of one ledger. :meth:`recover` first (it opens the file), then
    :meth:`hold` before each forwarded call and :meth:`settled` after its record."""

    def __init__(
        self,
        path: Path,
        *,
        replica_id: str = "",
        fsync: FsyncPolicy = FsyncPolicy.BATCH,
        compact_bytes: int = COMPACT_BYTES,
    ) -> None:
        self.path = path
        """The base name: segments are ``<path>.<n>``."""
        self._segment = 0
        self.replica_id = replica_id
        self._fsync = fsync
        self._compact_bytes = compact_bytes
        self._fd: int | None = None
        self._size = 0
        self._open: dict[str, bytes] = {}  # record id -> its Hold line
        self._open_bytes = 0
        self._deferred: list[str] = []
        """Calls settled while the sink held ledger lines in memory (its volume refused
        them): their holds stay open until those lines are in the file."""
        self._unwritten: Callable[[], int] = lambda: 0
        self._dirty = False
        self._dir_dirty = False  # a segment was created: the directory needs an fsync too
        self._task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None
        """Runs the fsync task (restarted with backoff should it fail); set by the gateway."""
        self.compactions = 0

    # -- start-up ------------------------------------------------------------------------

    def recover(
        self, sink: UsageSink, ledger: Path, metrics: GatewayMetrics | None = None
    ) -> list[UsageRecord]:
        """Charge the holds a previous run left unsettled, once; then start an empty
        journal. Returns the records charged (already emitted through ``sink``)."""
        assert self._fd is None, "recover() runs once, before the journal is used"
        self._unwritten = lambda: int(getattr(sink, "unwritten", 0) or 0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = segments(self.path)
        pending = _unsettled(old)
        if pending:
            in_ledger = _ids_in(ledger, set(pending))
            charged = [r for i, (r, _) in pending.items() if i not in in_ledger]
        else:
            in_ledger, charged = set(), []
        for record in charged:
            sink.emit(record)  # a numbered ledger line, delivered like any other
            if metrics is not None:
                metrics.interrupted_calls.labels(record.team).inc()
                metrics.cost.labels(record.team, record.served_model).inc(float(record.cost_usd))
        if charged:
            _fsync_file(ledger)  # the charges are durable before the holds are forgotten
            _log_recovery(charged, len(in_ledger))
        elif in_ledger:
            log.info("hold journal: %d calls in flight at the previous stop had reached the "
                     "ledger; nothing to charge", len(in_ledger))  # fmt: skip
        carried = b""
        if charged and self._unwritten():
            # The ledger's volume refused the charges (kept in the sink's memory): their
            # holds stay open, settled once the lines are in the file; a kill before that
            # charges them again, once, since the ledger does not have them.
            for record in charged:
                line = pending[record.id][1]
                self._open[record.id] = line
                self._open_bytes += len(line)
                self._deferred.append(record.id)
            carried = b"".join(self._open.values())
        number = int(old[-1].name.rsplit(".", 1)[1]) + 1 if old else 1
        self._start_segment(number, carried, durable=True)
        for path in old:
            path.unlink(missing_ok=True)  # a kill before this: the union is read again
        return charged

    # -- the request path ----------------------------------------------------------------

    def hold(self, call: Call, routes: tuple[ModelRoute, ...]) -> bool:
        """Write ``call``'s hold (its reservation) before it is forwarded. False if it
        could not be written: the call must not be forwarded (nobody could charge it)."""
        held = call.reservation
        assert held is not None
        assert self._fd is not None, "recover() first"
        line = self._hold_line(call, held.worst, routes, held.models)
        try:
            self._write(line)
        except OSError as exc:
            log.error("hold journal %s not writable (%s): call refused", self.current, exc)
            self._fresh_segment()  # no torn fragment for the next line to merge with
            return False
        self._open[call.id] = line
        self._open_bytes += len(line)
        return True

    def settled(self, call_id: str) -> None:
        """The call settled and its record went to the sink: its hold is done once the
        record is in the ledger file (at once, unless the sink keeps lines in memory
        because the volume refused them: then when they are written)."""
        if call_id not in self._open:
            return
        if self._unwritten():
            # The record may not be in the file: a kill now must still charge the call.
            self._deferred.append(call_id)
            self._ensure_task()
            return
        if self._deferred:
            self._settle_deferred()  # their lines are in the file too (written in order)
        self._settle(call_id)

    def _settle_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for call_id in deferred:
            self._settle(call_id)

    def _settle(self, call_id: str) -> None:
        line = self._open.pop(call_id, None)
        if line is None:
            return
        self._open_bytes -= len(line)
        try:
            self._write(b'{"kind":"Settled","id":"%s"}\n' % call_id.encode())
        except OSError as exc:
            # Recovery would find the record's id in the ledger, unless a rotation removed
            # it first: a new segment without this hold settles it for good.
            log.warning("hold journal %s: settlement not written (%s)", self.current, exc)
            self._fresh_segment()
            return
        if self._size >= self._compact_bytes and self._size >= 2 * self._open_bytes:
            self.compact()

    @property
    def deferred(self) -> int:
        """Settled calls whose records wait in the sink's memory for the ledger's volume."""
        return len(self._deferred)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    @property
    def journal_bytes(self) -> int:
        return self._size

    def _hold_line(
        self,
        call: Call,
        worst: WorstCase,
        routes: tuple[ModelRoute, ...],
        costs: tuple[tuple[str, Decimal], ...] = (),
    ) -> bytes:
        route, tier, fields = _charge(worst, routes, costs)
        fresh, cached, written, written_1h = fields
        caller, team = call.caller, call.team
        assert caller is not None
        assert team is not None
        cost = format_exact_usd(worst.cost)
        record = {
            "apiVersion": RECORD_API_VERSION,
            "kind": "UsageRecord",
            "id": call.id,
            "time": call.arrived,
            "team": team.id,
            "namespace": caller.namespace,
            "job": caller.job,
            "pod": caller.pod,
            "caller": caller.via,
            "endpoint": call.endpoint.value,
            "requestedModel": call.requested_model,
            "servedModel": route.name,
            "upstreamModel": route.upstream_model,
            "rule": call.rule,
            "policy": call.policy_id,
            "provider": route.provider.value,
            "tokens": {
                "input": fresh,
                "output": worst.output_tokens,
                "cachedInput": cached,
                "cacheCreation": written,
                "cacheCreation1h": written_1h,
            },
            "serviceTier": tier,
            "usageReported": True,
            "costUSD": cost,
            "outcome": Outcome.UPSTREAM_ERROR.value,
            "reason": INTERRUPTED_REASON,
            "httpStatus": 0,
            "streaming": call.streaming,
            "configRevision": call.revision,
            "gatewayReplica": self.replica_id,
            "labels": call_tags(caller),
            "task": call.task[:MAX_TASK],
            "sensitivity": call.sensitivity[:MAX_SENSITIVITY],
            "routeReason": call.reason[:MAX_ROUTE_REASON],
        }
        return orjson.dumps({"kind": "Hold", "reservedUSD": cost, "record": record}) + b"\n"

    # -- the file ------------------------------------------------------------------------

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(line)
        self._dirty = True
        self._ensure_task()

    @property
    def current(self) -> Path:
        """The segment being written."""
        return self.path.with_name(f"{self.path.name}.{self._segment}")

    def compact(self) -> None:
        """Start a new segment with only the calls still in flight and unlink the old one
        (synchronously, on the event loop: no hold is appended meanwhile). The flusher
        syncs the new segment and the directory within FLUSH_SECONDS, the window a node
        crash can lose, as for ledger lines."""
        previous = self.current
        self._start_segment(self._segment + 1, b"".join(self._open.values()), durable=False)
        previous.unlink(missing_ok=True)
        self.compactions += 1

    def _fresh_segment(self) -> None:
        """After a failed write: the calls in flight in a new segment, if it can be made."""
        try:
            self.compact()
        except OSError as exc:
            log.warning("hold journal: no new segment either (%s)", exc)

    def _start_segment(self, number: int, content: bytes, *, durable: bool) -> None:
        path = self.path.with_name(f"{self.path.name}.{number}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            sync = durable and self._fsync is FsyncPolicy.BATCH
            if sync:
                os.fsync(fd)
                _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment, self._size = fd, number, len(content)
        self._dirty = self._dir_dirty = not sync
        if not sync:
            self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None and (self._fsync is FsyncPolicy.BATCH or self._deferred):
            with contextlib.suppress(RuntimeError):  # no running loop: close() syncs
                if self.supervisor is not None:
                    self._task = self.supervisor.start("hold-journal-fsync", self._flusher)
                else:
                    self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self._deferred and not self._unwritten():
                self._settle_deferred()  # on the loop: the sink's lines are in the file now
            if self._fsync is not FsyncPolicy.BATCH:
                continue
            if self._dirty and self._fd is not None:
                self._dirty = False
                await asyncio.to_thread(os.fsync, self._fd)
            if self._dir_dirty:
                self._dir_dirty = False
                await asyncio.to_thread(_fsync_dir, self.path.parent)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _lines(path: Path) -> Iterator[bytes]:
    """Complete lines of a file; a torn last line (node crash mid-write) is skipped."""
    try:
        with path.open("rb") as file:
            for line in file:
                if line.endswith(b"\n"):
                    yield line
    except FileNotFoundError:
        return


def _unsettled(paths: Iterable[Path]) -> dict[str, tuple[UsageRecord, bytes]]:
    """Holds of the journal's segments without a settlement line (in any segment), by
    record id, oldest first. A line that does not parse (torn) or a hold that is not a
    valid record is skipped: a hold's line is written whole with one write(2), so only a
    node crash tears one."""
    holds: dict[str, tuple[UsageRecord, bytes]] = {}
    settled: set[str] = set()
    for line in (line for path in paths for line in _lines(path)):
        try:
            entry = orjson.loads(line)
            kind = entry.get("kind")
            if kind == "Settled":
                settled.add(str(entry["id"]))
            elif kind == "Hold":
                record = UsageRecord.model_validate(entry["record"])
                holds[record.id] = (record, line)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValidationError):
            log.warning("hold journal: an unreadable line skipped (torn by a node crash?)")
    return {i: r for i, r in holds.items() if i not in settled}


def _ids_in(ledger: Path, wanted: set[str]) -> set[str]:
    """Which of ``wanted`` are the id of a ledger line (a record written before the kill,
    or charged by a recovery that was itself interrupted)."""
    found: set[str] = set()
    for line in _lines(ledger):
        match = _ID.search(line)
        if match is not None and (record_id := match.group(1).decode()) in wanted:
            found.add(record_id)
    return found


def _log_recovery(charged: list[UsageRecord], reached: int) -> None:
    for record in charged[:LOGGED_CALLS]:
        log.warning(
            "call %s of team %s (namespace %s, job %s, model %s) was in flight when the "
            "gateway stopped: charged at its reservation, %s USD",
            record.id, record.team, record.namespace, record.job or "-",
            record.served_model, format_exact_usd(record.cost_usd),
        )  # fmt: skip
    total = sum((r.cost_usd for r in charged), Decimal(0))
    teams = sorted({r.team for r in charged})
    log.warning(
        "hold journal: %d calls interrupted by the previous stop charged at their "
        "reservation (%s USD in all; teams %s); %d more had reached the ledger",
        len(charged), format_exact_usd(total), ", ".join(teams), reached,
    )  # fmt: skip


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
