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
from collections import deque
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson

from costwarden.api.teambudget import BudgetPhase
from costwarden.api.usage import LoopSignal, UsageRecord
from costwarden.gateway.sinks import FsyncPolicy, JsonlLedgerSink
from costwarden.supervision import Supervisor

log = logging.getLogger("costwarden.gateway.reporting")

SEND_SECONDS = 0.25
MAX_BATCH = 2000
MAX_QUEUED = 200_000
"""Unacknowledged entries held in memory; beyond this, a ledger is re-read when the queue
drains (nothing lost), and without a ledger the oldest are dropped (counted)."""
BACKOFF_MAX = 5.0
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
    ) -> None:
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
        self._ledger_path = ledger
        self._ledger: JsonlLedgerSink | None = None
        self._cursor_path = ledger.with_name(ledger.name + ".cursor") if ledger else None
        self._reload_needed = False
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
        lines = _complete_lines(path)
        cursor = _read_cursor(self._cursor_path) if self._cursor_path else None
        if cursor is not None and cursor[1] <= lines:
            source, self.acked = cursor
        else:
            # No cursor: a new ledger (or reporting newly enabled: everything is unsent).
            # Cursor past the end: the ledger lost acknowledged lines; a new source keeps
            # new numbers from colliding with the old ones (already counted).
            source = f"{replica_id}/{secrets.token_hex(4)}"
            self.acked = 0 if cursor is None else lines
            self._write_cursor(source, self.acked)
        self._ledger = JsonlLedgerSink(path, self._fsync)
        self._load_unacked(path)
        return source, lines

    def _load_unacked(self, path: Path) -> None:
        self._queue.clear()
        self._reload_needed = False
        with path.open("rb") as ledger:
            for seq, line in enumerate(ledger, start=1):
                if seq <= self.acked or not line.endswith(b"\n"):
                    continue
                if len(self._queue) >= MAX_QUEUED:
                    self._reload_needed = True
                    return
                entry = _entry(line)
                if entry is not None:
                    self._queue.append((seq, *entry))

    # -- the UsageSink protocol ----------------------------------------------------------

    def emit(self, record: UsageRecord) -> None:
        # toolCalls only when there are some: an operator older than the gateway (during an
        # upgrade) forbids fields it does not know, and most calls have none.
        exclude = None if record.tool_calls else {"tool_calls"}
        self._append(b"record", record.model_dump_json(by_alias=True, exclude=exclude).encode())

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        self._append(b"loopSignal", signal.model_dump_json(by_alias=True).encode())

    def _append(self, key: bytes, raw: bytes) -> None:
        self.seq += 1
        if self._ledger is not None:
            self._ledger.append_now(raw + b"\n")  # line number == seq, before the answer
        if len(self._queue) >= MAX_QUEUED:
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
        return len(self._queue)

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
            if not self._queue:
                backoff = self._send_seconds
                continue
            backoff = (
                self._send_seconds
                if await self.send_once()
                else min(max(backoff * 2, 0.5), BACKOFF_MAX)
            )

    async def send_once(self) -> bool:
        """Send the oldest unacknowledged entries once; True if they were acknowledged."""
        batch = list(self._queue)[:MAX_BATCH]
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
        if self.on_phases is not None and ack.get("teams"):
            self.on_phases({team: BudgetPhase(p) for team, p in ack["teams"].items()})
        if acked > self.acked:
            self.acked = acked
            if self._cursor_path is not None:
                await asyncio.to_thread(self._write_cursor, self.source, acked)
        # Forget entries only once the cursor says so: a crash in between re-sends them
        # (a no-op for the operator), never loses them.
        while self._queue and self._queue[0][0] <= acked:
            self._queue.popleft()
        return True

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
        before = len(self._queue)
        kept = deque(entry for entry in self._queue if entry[0] not in seqs)
        dropped = before - len(kept)
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
        async with self._session.post(self.url, data=body, headers=headers) as response:
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
        temporary.write_bytes(orjson.dumps({"source": source, "ackedSeq": acked}))
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


def _entry(line: bytes) -> tuple[bytes, bytes] | None:
    raw = line.rstrip(b"\n")
    try:
        kind = orjson.loads(raw).get("kind")
    except orjson.JSONDecodeError:
        return None  # a torn line (node crash): its number is used, its content lost
    return (b"loopSignal" if kind == "LoopSignal" else b"record"), raw


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


def _read_cursor(path: Path) -> tuple[str, int] | None:
    try:
        data = orjson.loads(path.read_bytes())
        return str(data["source"]), int(data["ackedSeq"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
