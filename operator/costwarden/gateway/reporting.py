"""Usage delivery to the operator: ordered, numbered, re-sent until acknowledged.

Every record and loop signal gets a sequence number ``seq`` (1, 2, 3, …) and, with a
ledger, is written as line ``seq`` of the ledger *before* the call's answer leaves the
gateway (one ``write(2)``, no fsync on the request path). A background task sends what is
not yet acknowledged, oldest first, every :data:`SEND_SECONDS` to ``POST /v1/usage`` of
the operator; the answer carries the highest ``seq`` applied, which is written to a cursor
file next to the ledger (``<ledger>.cursor``). After a restart the gateway re-reads the
ledger past the cursor and sends it again; the operator ignores what it had applied
already (per-source cursors), so delivery is at-least-once and counting exactly-once.

The *source* id names the ledger, not the process: it lives in the cursor file, so a
restarted container with the same ledger continues the same stream. If the ledger lost
lines that were acknowledged (a node crash before fsync, a rotated file), numbering would
reuse acknowledged numbers, so a new source id is started instead. Without a ledger the
source is the replica id plus a random suffix, and a crash loses what was unacknowledged
(documented in docs/accounting.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson

from costwarden.api.teambudget import BudgetPhase
from costwarden.api.usage import LoopSignal, UsageRecord
from costwarden.gateway.sinks import FsyncPolicy, JsonlLedgerSink, worth_keeping
from costwarden.supervision import Supervisor

log = logging.getLogger("costwarden.gateway.reporting")

SEND_SECONDS = 0.25
MAX_BATCH = 2000
MAX_QUEUED = 200_000
"""Unacknowledged entries held in memory; beyond this, a ledger is re-read when the queue
drains (nothing lost), and without a ledger the oldest are dropped (counted)."""
BACKOFF_MAX = 5.0
ROTATE_BYTES = 4 * 1024 * 1024
"""Once the ledger is this large, it is rewritten with only what is not yet acknowledged."""
MAX_LEDGER_BYTES = 48 * 1024 * 1024
"""Default bound of the ledger (the chart's emptyDir is 64 MiB): at the bound new calls are
refused (503 ledger_full) rather than usage lost (docs/ledger.md)."""
PARKED_PER_BATCH = 500
"""Held entries re-sent per batch, oldest first (the rest of the batch is fresh entries)."""
PARKED_RETRY_MIN = 5.0
PARKED_RETRY_MAX = 60.0
CLOSE_SECONDS = 5.0

PhaseListener = Callable[[dict[str, BudgetPhase]], None]


class OperatorReportingSink:
    def __init__(
        self,
        url: str,
        *,
        replica_id: str,
        ledger: Path | None = None,
        fsync: FsyncPolicy = FsyncPolicy.BATCH,
        token_file: Path | None = None,
        token: str | None = None,
        on_phases: PhaseListener | None = None,
        on_rejected: Callable[[str], None] | None = None,
        send_seconds: float = SEND_SECONDS,
        ca_file: Path | None = None,
        max_bytes: int = MAX_LEDGER_BYTES,
        rotate_bytes: int = ROTATE_BYTES,
    ) -> None:
        self.max_bytes = max_bytes
        self._rotate_bytes = rotate_bytes
        self._base = 0  # seq of the line before the ledger's first entry (after rotations)
        self._size = 0
        self.rotations = 0
        self._rotation_failing = False
        self.url = url.rstrip("/") + "/v1/usage"
        self._ca_file = ca_file
        self._ca_stamp: tuple[int, int, int] | None = None
        self._token_file = token_file
        self._token = token
        self.on_phases = on_phases
        self.on_rejected = on_rejected
        self._send_seconds = send_seconds
        self._fsync = fsync
        self._queue: deque[tuple[int, bytes, bytes]] = deque()  # seq, item key, raw JSON
        # Held teams (the operator could not write their books; batch.BatchAck.held): their
        # entries wait here, in seq order, and are re-sent every PARKED_RETRY_* seconds;
        # every later entry of a held team joins them, so its cursor never skips one.
        self._held: dict[str, str] = {}  # team -> reason
        self._parked: list[tuple[int, bytes, bytes, str]] = []  # seq, key, raw, team
        self._held_from = 0
        self._parked_due = 0.0
        self._parked_backoff = PARKED_RETRY_MIN
        self._ledger_path = ledger
        self._ledger: JsonlLedgerSink | None = None
        self._cursor_path = ledger.with_name(ledger.name + ".cursor") if ledger else None
        self._reload_needed = False
        self._cursor_stale = False
        self._task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None
        """Runs the sender (restarted with backoff should it fail); set by the gateway."""
        self._session: aiohttp.ClientSession | None = None
        self.acked = 0
        self.dropped = 0
        self.rejected = 0
        """Entries the operator refused for good (dropped, never counted)."""
        self.failures = 0
        if ledger is None:
            self.source = f"{replica_id}/{secrets.token_hex(4)}"
            self.seq = 0
        else:
            self.source, self.seq = self._open_ledger(ledger, replica_id)

    # -- start-up: the ledger and its cursor ---------------------------------------------

    def _open_ledger(self, path: Path, replica_id: str) -> tuple[str, int]:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._base, header = _ledger_base(path)
        lines = self._base + _complete_lines(path) - header  # the last seq in the ledger
        cursor = _read_cursor(self._cursor_path) if self._cursor_path else None
        if cursor is not None and cursor[1] <= lines:
            source, self.acked = cursor[0], cursor[1]
            self._held = dict.fromkeys(cursor[3], "held before a restart")
            self._held_from = cursor[2] if self._held else 0
        else:
            # No cursor: a new ledger (or reporting newly enabled: everything is unsent).
            # Cursor past the end: the ledger lost acknowledged lines; a new source keeps
            # new numbers from colliding with the old ones (already counted).
            source = f"{replica_id}/{secrets.token_hex(4)}"
            self.acked = 0 if cursor is None else lines
            self._write_cursor(source, self.acked)
        self._ledger = JsonlLedgerSink(path, self._fsync)
        self._size = path.stat().st_size
        self._load_unacked(path)
        return source, lines

    def _load_unacked(self, path: Path) -> None:
        self._queue.clear()
        self._parked.clear()
        self._reload_needed = False
        held_from = self._held_from if self._held else self.acked + 1
        seen: set[int] = set()
        if self._held:
            # Held entries the ledger rotated past are in the held file (_maybe_rotate).
            for seq, key, raw, team in _read_held(self._held_path):
                if team in self._held and seq not in seen:
                    seen.add(seq)
                    self._parked.append((seq, key, raw, team))
        with path.open("rb") as ledger:
            first = ledger.readline()
            if not first.startswith(_HEADER):
                ledger.seek(0)
            for seq, line in enumerate(ledger, start=self._base + 1):
                if seq < held_from or not line.endswith(b"\n"):
                    continue
                entry = _entry(line)
                if entry is None:
                    continue
                key, raw, team = entry
                if team in self._held:
                    if seq not in seen:
                        self._parked.append((seq, key, raw, team))
                    continue
                if seq <= self.acked:
                    continue
                if len(self._queue) >= MAX_QUEUED:
                    self._reload_needed = True
                    return
                self._queue.append((seq, key, raw))
        self._parked.sort(key=lambda e: e[0])

    # -- the UsageSink protocol ----------------------------------------------------------

    def unacked_usage(self) -> Iterator[tuple[str, int, Decimal, datetime]]:
        """(team, seq, cost, time) of every usage record not yet acknowledged: after a
        restart, what this replica has spent that the operator has not yet applied."""
        entries = [(seq, key, raw) for seq, key, raw, _ in self._parked] + list(self._queue)
        for seq, key, raw in entries:
            if key != b"record":
                continue
            try:
                item = orjson.loads(raw)
                cost = Decimal(str(item.get("costUSD", "0")))
                when = datetime.fromisoformat(str(item["time"]).replace("Z", "+00:00"))
            except (orjson.JSONDecodeError, KeyError, ValueError, ArithmeticError):
                continue
            if cost > 0 and item.get("team"):
                yield str(item["team"]), seq, cost, when

    def emit(self, record: UsageRecord) -> None:
        # toolCalls only when there are some: an operator older than the gateway (during an
        # upgrade) forbids fields it does not know, and most calls have none.
        if not worth_keeping(record):
            return  # costs nothing, changes no books: not in the ledger, not sent
        exclude = None if record.tool_calls else {"tool_calls"}
        raw = record.model_dump_json(by_alias=True, exclude=exclude).encode()
        self._append(b"record", raw, record.team)

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        self._append(b"loopSignal", signal.model_dump_json(by_alias=True).encode(), signal.team)

    def _append(self, key: bytes, raw: bytes, team: str = "") -> None:
        self.seq += 1
        if self._ledger is not None:
            self._ledger.append_now(raw + b"\n")  # line (after the base) == seq, before the answer
            self._size += len(raw) + 1
        if team and team in self._held:
            self._parked.append((self.seq, key, raw, team))  # behind its team's held entries
        elif len(self._queue) >= MAX_QUEUED:
            if self._ledger is not None:
                self._reload_needed = True  # still in the ledger: read again later
            else:
                self._queue.popleft()
                self.dropped += 1
                self._queue.append((self.seq, key, raw))
        elif not self._reload_needed:
            self._queue.append((self.seq, key, raw))
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop yet: started on emit
                if self.supervisor is not None:
                    self._task = self.supervisor.start("usage-reporting", self._sender)
                else:
                    self._task = asyncio.get_running_loop().create_task(self._sender())

    def start(self) -> None:
        """Send what a previous run left unacknowledged without waiting for a new call."""
        self._ensure_task()

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._parked)

    @property
    def full(self) -> bool:
        """The ledger reached its bound, or its volume refuses writes: the gateway refuses
        new calls (503 ledger_full) until acknowledged entries are rotated out, or the
        entries kept in memory are written (docs/ledger.md)."""
        return self._ledger is not None and (
            self._size >= self.max_bytes or self._ledger.unwritten > 0
        )

    @property
    def write_error(self) -> str:
        """Why the ledger cannot be written now ("" when it can)."""
        return self._ledger.write_error if self._ledger is not None else ""

    @property
    def unwritten(self) -> int:
        """Entries answered but not yet on the ledger's volume (kept in memory)."""
        return self._ledger.unwritten if self._ledger is not None else 0

    @property
    def ledger_bytes(self) -> int:
        return self._size

    def _maybe_rotate(self) -> None:
        """Rewrite the ledger without its acknowledged entries once it is ROTATE_BYTES large,
        or at any size while its volume refuses writes (to make room).

        On the event loop, synchronously: no entry is appended meanwhile. The new file
        starts with a header line naming its base (the seq before its first entry), is
        fsync'd and then atomically renamed over the ledger, so a crash leaves either the
        old ledger or the new one, both complete; the cursor file is unaffected (seqs).
        A full volume has no room for the new file: then, if every entry in the file is
        acknowledged and none is held, the file is cut to its header in place instead."""
        if self._ledger is None or self._ledger_path is None:
            return
        unwritten = self._ledger.unwritten
        if self._size < self._rotate_bytes and not unwritten:
            return
        in_file = self.seq - unwritten  # the last seq in the file; later ones are in memory
        keep = min(self.acked + 1, in_file + 1)  # held (parked) entries: the held file
        if self._queue:
            keep = min(keep, self._queue[0][0])
        if keep - 1 <= self._base:
            return  # nothing acknowledged to remove
        try:
            self._rotate(keep)
            self._rotation_failing = False
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._ledger_path.with_name(self._ledger_path.name + ".rotate").unlink()
            if keep - 1 < in_file or self._parked:
                (log.debug if self._rotation_failing else log.warning)(
                    "usage ledger rotation failed (%s); retried later", exc
                )
                self._rotation_failing = True
                return
            # Everything in the file is acknowledged: nothing is lost by cutting it.
            self._ledger.restart_empty(_HEADER + b"%d}\n" % in_file)
            self._base = in_file
            self._size = self._ledger.ledger_bytes
            self.rotations += 1
            log.warning("usage ledger cut to its header in place (%s): every entry in it "
                        "was acknowledged", exc)  # fmt: skip

    def _rotate(self, keep: int) -> None:
        assert self._ledger is not None
        assert self._ledger_path is not None
        path = self._ledger_path
        if self._parked:
            # Held entries are kept in the held file, so that one held team never pins the
            # ledger (and, at its bound, every other team's calls); written before the
            # ledger is replaced, so a crash in between leaves them in one file or both.
            self._write_held()
        temporary = path.with_name(path.name + ".rotate")
        with path.open("rb") as old, temporary.open("wb") as new:
            new.write(_HEADER + b"%d}\n" % (keep - 1))
            first = old.readline()
            if not first.startswith(_HEADER):
                old.seek(0)
            for seq, line in enumerate(old, start=self._base + 1):
                if seq >= keep:
                    new.write(line)
            new.flush()
            os.fsync(new.fileno())
        os.replace(temporary, path)
        _fsync_dir(path.parent)
        self._ledger.reopen()
        self._base = keep - 1
        self._size = path.stat().st_size
        self.rotations += 1

    @property
    def _held_path(self) -> Path | None:
        path = self._ledger_path
        return path.with_name(path.name + ".held") if path is not None else None

    def _write_held(self) -> None:
        """The held entries, ``{"seq","team","key","item"}`` per line, fsync'd, renamed."""
        path = self._held_path
        assert path is not None
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("wb") as held:
            for seq, key, raw, team in self._parked:
                held.write(b'{"seq":%d,"team":%s,"key":"%s","item":%s}\n'
                           % (seq, orjson.dumps(team), key, raw))  # fmt: skip
            held.flush()
            os.fsync(held.fileno())
        os.replace(temporary, path)
        _fsync_dir(path.parent)

    @property
    def held_teams(self) -> dict[str, str]:
        """Teams whose usage the operator holds (team -> reason); their entries are kept."""
        return dict(self._held)

    def _parked_ready(self) -> bool:
        return bool(self._parked) and time.monotonic() >= self._parked_due

    # -- sending -------------------------------------------------------------------------

    async def _sender(self) -> None:
        backoff = self._send_seconds
        while True:
            await asyncio.sleep(backoff)
            if self._ledger is not None and self._fsync is FsyncPolicy.BATCH:
                await asyncio.to_thread(self._ledger.sync)
            if not self._queue and self._reload_needed and self._ledger_path is not None:
                # On the loop, not in a thread: no emit may interleave with the re-read,
                # or the queue would lose its order. Only after an overflow.
                self._load_unacked(self._ledger_path)
            # The volume refused entries: write them once it takes them again, or make
            # room by removing acknowledged entries (they are sent meanwhile).
            unwritten = self._ledger is not None and self._ledger.unwritten > 0
            if unwritten and not self._ledger.retry_unwritten():  # type: ignore[union-attr]
                self._maybe_rotate()
            if not self._queue and not self._parked_ready():
                backoff = self._send_seconds
                continue
            backoff = (
                self._send_seconds
                if await self.send_once()
                else min(max(backoff * 2, 0.5), BACKOFF_MAX)
            )

    async def send_once(self) -> bool:
        """Send the oldest unacknowledged entries once; True if they were acknowledged."""
        parked = self._parked[:PARKED_PER_BATCH] if self._parked_ready() else []
        fresh = list(self._queue)[: MAX_BATCH - len(parked)]
        batch = sorted([(seq, key, raw) for seq, key, raw, _ in parked] + fresh)
        if not batch:
            return True
        body = _batch_body(self.source, batch)
        try:
            status, answer = await self._post(body)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.failures += 1
            log.warning("usage report to %s failed (%s); retrying", self.url, exc)
            return False
        if status == 403 and self._drop_rejected(answer):
            return True  # the rest goes out at once; its acknowledgement moves the cursor
        if status != 200:
            self.failures += 1
            log.warning("usage report refused: HTTP %s %s", status, answer[:200])
            return False
        ack = orjson.loads(answer)
        acked = int(ack.get("ackedSeq", 0))
        held = {int(h["seq"]): (str(h["team"]), str(h.get("reason", ""))) for h in
                ack.get("held") or []}  # fmt: skip
        if held:
            acked = max(acked, int(ack.get("appliedThrough") or 0))
        if self.on_phases is not None and ack.get("teams"):
            self.on_phases({team: BudgetPhase(p) for team, p in ack["teams"].items()})
        self._settle_parked(parked, held, fresh, acked)
        if acked > self.acked or self._cursor_stale:
            self.acked = max(self.acked, acked)
            self._cursor_stale = False
            if self._cursor_path is not None:
                try:
                    await asyncio.to_thread(self._write_cursor, self.source, self.acked)
                except OSError as exc:
                    # A full volume: written with a later answer. A crash meanwhile
                    # re-sends from the old cursor, which the operator de-duplicates.
                    self._cursor_stale = True
                    log.warning("usage cursor file not written (%s); retried", exc)
        # Forget entries only once the cursor says so: a crash in between re-sends them
        # (a no-op for the operator), never loses them. Held ones moved to _parked above.
        while self._queue and self._queue[0][0] <= acked:
            self._queue.popleft()
        self._maybe_rotate()
        return True

    def _settle_parked(
        self,
        sent_parked: list[tuple[int, bytes, bytes, str]],
        held: dict[int, tuple[str, str]],
        fresh: list[tuple[int, bytes, bytes]],
        acked: int,
    ) -> None:
        """Apply an answer to the held teams: parked entries applied are forgotten, fresh
        entries held are parked (with every later queued entry of their team), teams with
        nothing parked left are released. Marks the cursor file stale when this changed."""
        if not sent_parked and not held:
            return
        before = (set(self._held), self._held_from)
        applied = {seq for seq, *_ in sent_parked if seq not in held}
        for team, reason in held.values():
            if team not in self._held:
                log.error("usage of team %s held by the operator (%s): kept and re-sent; "
                          "other teams unaffected", team, reason)  # fmt: skip
            self._held[team] = reason
        newly: list[tuple[int, bytes, bytes, str]] = []
        for seq, key, raw in fresh:
            if seq in held and seq <= acked:
                newly.append((seq, key, raw, held[seq][0]))
        kept: deque[tuple[int, bytes, bytes]] = deque()
        for entry in self._queue:
            if entry[0] <= acked:
                continue  # popped by the caller (applied, or parked just above)
            team = _team_of(entry[2])
            if team in self._held:
                newly.append((*entry, team))
            else:
                kept.append(entry)
        if newly:
            self._queue = deque([e for e in self._queue if e[0] <= acked] + list(kept))
        parked = [e for e in self._parked if e[0] not in applied] + newly
        self._parked = sorted(parked, key=lambda e: e[0])
        if sent_parked:
            sent = {seq for seq, *_ in sent_parked}
            if any(seq in sent for seq in held):
                self._parked_due = time.monotonic() + self._parked_backoff
                self._parked_backoff = min(self._parked_backoff * 2, PARKED_RETRY_MAX)
            else:
                self._parked_due = 0.0  # they apply again: send the rest at once
                self._parked_backoff = PARKED_RETRY_MIN
        elif newly:
            self._parked_due = time.monotonic() + self._parked_backoff
        waiting = {team for *_, team in self._parked}
        for team in [t for t in self._held if t not in waiting]:
            log.warning("usage of team %s applies again; released", team)
            del self._held[team]
        self._held_from = self._parked[0][0] if self._parked else 0
        if (set(self._held), self._held_from) != before:
            self._cursor_stale = True
        held_path = self._held_path
        if not self._parked and held_path is not None:
            held_path.unlink(missing_ok=True)  # nothing held: the held file is stale

    def _ca_changed(self) -> bool:
        """Whether the CA bundle file changed since the session was made (the operator
        publishes a new CA when it starts with a new certificate; the kubelet updates the
        mounted ConfigMap)."""
        if self._ca_file is None:
            return False
        try:
            st = os.stat(self._ca_file)
        except OSError:
            return self._ca_stamp is not None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return stamp != self._ca_stamp

    def _ssl(self) -> ssl.SSLContext | bool:
        """Verify the operator against the CA bundle (never skip verification: the token
        would go to whoever answers)."""
        if self._ca_file is None:
            return True  # the system's CAs
        st = os.stat(self._ca_file)  # missing: OSError, the send is retried
        self._ca_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return ssl.create_default_context(cafile=str(self._ca_file))

    def _drop_rejected(self, answer: bytes) -> bool:
        """The operator refused some entries for good (they disagree with what it recomputes:
        docs/security-ingestion.md) and applied nothing of the batch. Drop those entries, so
        the batch is not re-sent forever, and keep the rest for the next send. True if any
        entry was dropped."""
        try:
            rejected = orjson.loads(answer).get("rejected") or []
            seqs = {int(entry["seq"]): str(entry.get("reason", "")) for entry in rejected}
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return False
        before = len(self._queue) + len(self._parked)
        kept = deque(entry for entry in self._queue if entry[0] not in seqs)
        self._parked = [entry for entry in self._parked if entry[0] not in seqs]
        dropped = before - len(kept) - len(self._parked)
        if not dropped:
            return False
        self._queue = kept
        self.rejected += dropped
        for seq, reason in sorted(seqs.items())[:10]:
            log.error("usage entry seq %d of %s refused by the operator (%s); not counted",
                      seq, self.source, reason)  # fmt: skip
        if self.on_rejected is not None:
            for reason in seqs.values():
                self.on_rejected(reason)
        return True

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        return await self.post("/v1/usage", body)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST JSON to ``path`` of the operator, with this sink's credential and TLS (the
        lease requests of gateway/leases.py travel the same way as usage)."""
        if self._session is not None and not self._session.closed and self._ca_changed():
            await self._session.close()
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl())
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30), connector=connector
            )
        headers = {"Content-Type": "application/json"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.url.removesuffix("/v1/usage") + path
        async with self._session.post(url, data=body, headers=headers) as response:
            return response.status, await response.read()

    def _bearer(self) -> str:
        if self._token_file is not None:
            # Re-read: projected service-account tokens rotate.
            with contextlib.suppress(OSError):
                return self._token_file.read_text().strip()
        return self._token or ""

    def _write_cursor(self, source: str, acked: int) -> None:
        assert self._cursor_path is not None
        temporary = self._cursor_path.with_name(self._cursor_path.name + ".tmp")
        cursor: dict[str, object] = {"source": source, "ackedSeq": acked}
        if self._held:
            # Entries of these teams from heldFrom on are not applied (the operator held
            # them): after a restart they are read back from the ledger and re-sent.
            cursor["heldFrom"] = self._held_from
            cursor["heldTeams"] = sorted(self._held)
        temporary.write_bytes(orjson.dumps(cursor))
        os.replace(temporary, self._cursor_path)

    async def close(self) -> None:
        """Stop the sender, try once more (bounded) to deliver the rest, close the ledger."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                while self._queue and await self.send_once():
                    pass
        if self._session is not None:
            await self._session.close()
        if self._ledger is not None:
            await self._ledger.close()


def _batch_body(source: str, batch: list[tuple[int, bytes, bytes]]) -> bytes:
    """The batch JSON, built from the stored JSON of each entry (never re-serialized)."""
    items = b",".join(b'{"seq":%d,"%s":%s}' % (seq, key, raw) for seq, key, raw in batch)
    return b'{"kind":"UsageBatch","source":' + orjson.dumps(source) + b',"items":[' + items + b"]}"


def _entry(line: bytes) -> tuple[bytes, bytes, str] | None:
    raw = line.rstrip(b"\n")
    try:
        data = orjson.loads(raw)
        kind, team = data.get("kind"), str(data.get("team") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return None  # a torn line (node crash): its number is used, its content lost
    return (b"loopSignal" if kind == "LoopSignal" else b"record"), raw, team


_HEADER = b'{"kind":"LedgerBase","base":'


def _ledger_base(path: Path) -> tuple[int, int]:
    """(base, 1) if the ledger starts with a rotation header, else (0, 0)."""
    try:
        with path.open("rb") as ledger:
            first = ledger.readline()
    except OSError:
        return 0, 0
    if first.startswith(_HEADER) and first.endswith(b"\n"):
        try:
            return int(orjson.loads(first)["base"]), 1
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    return 0, 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_held(path: Path | None) -> list[tuple[int, bytes, bytes, str]]:
    """The held file's entries; a torn or unreadable line is skipped (it is also still in
    the ledger unless a rotation completed, which happens only after the file was synced)."""
    if path is None or not path.exists():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            data = orjson.loads(line)
            key = b"loopSignal" if data["key"] == "loopSignal" else b"record"
            entries.append((int(data["seq"]), key, orjson.dumps(data["item"]), str(data["team"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return entries


def _team_of(raw: bytes) -> str:
    try:
        return str(orjson.loads(raw).get("team") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def _complete_lines(path: Path) -> int:
    """Complete lines in the ledger; a torn last line gets its newline, so that it keeps
    its number and the next line does not merge into it."""
    if not path.exists():
        return 0
    count = 0
    last = b"\n"
    with path.open("rb") as ledger:
        while chunk := ledger.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        with path.open("ab") as ledger:
            ledger.write(b"\n")
        count += 1
    return count


def _read_cursor(path: Path) -> tuple[str, int, int, list[str]] | None:
    """(source, ackedSeq, heldFrom, heldTeams) of the cursor file, None if unreadable."""
    try:
        data = orjson.loads(path.read_bytes())
        teams = [str(t) for t in data.get("heldTeams") or []]
        return str(data["source"]), int(data["ackedSeq"]), int(data.get("heldFrom", 0)), teams
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
