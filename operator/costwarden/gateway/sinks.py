"""Where usage records and loop signals go: the JSON Lines ledger, memory, or several.

All sinks implement :class:`costwarden.api.usage.UsageSink`; ``emit`` never blocks the
request path. The ledger's format and durability are documented in docs/ledger.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from enum import StrEnum
from pathlib import Path

from costwarden.api.usage import LoopSignal, Outcome, UsageRecord, UsageSink
from costwarden.supervision import Supervisor

log = logging.getLogger("costwarden.gateway.sinks")

FLUSH_SECONDS = 0.2


class FsyncPolicy(StrEnum):
    BATCH = "batch"
    """Every line is written (write(2)) before the call's answer; fsync every 0.2 s at most:
    a killed process loses nothing answered, a node crash at most the last 0.2 s."""
    NONE = "none"
    """Written before the answer, fsync left to the kernel: a killed process loses nothing
    answered, a node crash more than with ``batch``."""


def worth_keeping(record: UsageRecord) -> bool:
    """Whether a ledger keeps the record. A call no team can be charged for (unattributed,
    unauthenticated) and a call the gateway refused before any upstream call cost nothing
    and change no books: they stay out of the ledger, so a flood of junk or refused calls
    cannot fill its volume (docs/ledger.md). They still reach the metrics and the decision
    log (one line per call)."""
    if not record.team:
        return False
    return not (
        record.outcome is Outcome.REFUSED
        and not record.usage_reported
        and record.cost_usd == 0
        and record.tokens.total() == 0
    )


class MemorySink:
    """Keeps everything in lists: for tests and embedding."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.loop_signals: list[LoopSignal] = []

    def emit(self, record: UsageRecord) -> None:
        self.records.append(record)

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        self.loop_signals.append(signal)

    async def close(self) -> None:
        return None


class JsonlLedgerSink:
    """Appends one JSON object per line to a file: each line with one ``write`` on an
    ``O_APPEND`` descriptor as it is emitted (so several writers, a restarted process,
    never interleave within a line, and a line is in the page cache before the call's
    answer), fsync'd from a background task every :data:`FLUSH_SECONDS` (policy batch).
    """

    def __init__(
        self, path: Path, fsync: FsyncPolicy = FsyncPolicy.BATCH, max_bytes: int | None = None
    ) -> None:
        self.path = path
        self._fsync = fsync
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = []
        self._unwritten: deque[bytes] = deque()
        """Lines the volume refused (full, failing), in order: kept in memory and written
        first, before any later line, once it takes them again (``retry_unwritten``)."""
        self._header_unwritten = False  # restart_empty's header is first in _unwritten
        self.write_error = ""
        """Why the last write failed (while lines are unwritten), for the refusal."""
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None
        """Runs the flusher (restarted with backoff should it fail); set by the gateway."""

    def emit(self, record: UsageRecord) -> None:
        # Written at once (one write(2), before the call's answer leaves the gateway): a
        # killed process loses nothing it answered; fsync follows within FLUSH_SECONDS
        # (policy batch), which bounds what a node crash can lose (docs/ledger.md).
        if not worth_keeping(record):
            return
        self.append_now(record.model_dump_json(by_alias=True).encode() + b"\n")
        self._ensure_task()

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        self.append_now(signal.model_dump_json(by_alias=True).encode() + b"\n")
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: close() writes it
                if self.supervisor is not None:
                    self._task = self.supervisor.start("ledger-flush", self._flusher)
                else:
                    self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self._unwritten:
                self.retry_unwritten()  # on the loop: no line may be appended meanwhile
            if self._pending:
                await asyncio.to_thread(self._write, self._take())
            if self._dirty and self._fsync is FsyncPolicy.BATCH:
                self._dirty = False
                await asyncio.to_thread(os.fsync, self._fd)

    def _take(self) -> bytes:
        batch, self._pending = self._pending, []
        return b"".join(batch)

    def _write(self, data: bytes) -> None:
        self._write_all(data)
        if self._fsync is FsyncPolicy.BATCH:
            os.fsync(self._fd)

    @property
    def ledger_bytes(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        """At its bound (``max_bytes``), or its volume refuses writes (lines unwritten):
        the gateway refuses new calls (503 ledger_full) rather than lose their usage.
        Nothing acknowledges a ledger-only ledger, so it is never rotated by the gateway
        (docs/ledger.md)."""
        return bool(self._unwritten) or (
            self.max_bytes is not None and self._size >= self.max_bytes
        )

    @property
    def unwritten(self) -> int:
        """Entries answered but not yet in the file (the volume refused them)."""
        return len(self._unwritten) - self._header_unwritten

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            if len(view) != len(data):  # part of it was written: cut it off again
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def append_now(self, line: bytes) -> None:
        """Write one ``\n``-terminated line at once, no fsync (``sync`` does that): for a
        consumer that numbers ledger lines and must never get ahead of the file
        (gateway/reporting.py). Do not mix with ``emit`` on the same ledger.

        A line the volume refuses (ENOSPC, EDQUOT, EIO...) is kept in memory, in order,
        and so is every later line until ``retry_unwritten`` writes them: the call it
        records was made (the upstream bills it) and is answered; meanwhile ``full`` is
        true, so the gateway makes no new call it could not record."""
        if not self._unwritten:
            try:
                self._write_all(line)
            except OSError:
                pass  # kept below, and reported by retry_unwritten
            else:
                self._dirty = True
                return
        self._unwritten.append(line)
        self.retry_unwritten()

    def retry_unwritten(self) -> bool:
        """Write the lines kept in memory, oldest first; True once none is left. A line
        is written whole or not at all: a partial write is cut back off the file, so the
        file's line numbers stay those of the entries (gateway/reporting.py)."""
        while self._unwritten:
            line = self._unwritten[0]
            try:
                self._write_all(line)
            except OSError as exc:
                if not self.write_error:
                    log.error(
                        "usage ledger %s cannot be written (%s): new calls are refused (503 "
                        "ledger_full) until it can; %d entry(ies) kept in memory meanwhile",
                        self.path, exc.strerror or exc, len(self._unwritten),
                    )  # fmt: skip
                self.write_error = exc.strerror or str(exc)
                return False
            self._unwritten.popleft()
            self._header_unwritten = False
            self._dirty = True
        if self.write_error:
            log.warning("usage ledger %s can be written again; calls resume", self.path)
            self.write_error = ""
        return True

    def restart_empty(self, header: bytes) -> None:
        """Cut the file to ``header`` alone, in place (no second file, so it needs no free
        space): for a ledger whose every line is acknowledged, when a rotation could not
        write its new file on a full volume. The header goes first among the lines kept in
        memory, so it precedes every later line even if it cannot be written yet."""
        os.ftruncate(self._fd, 0)
        self._size = 0
        self._unwritten.appendleft(header)
        self._header_unwritten = True
        self.retry_unwritten()

    def reopen(self) -> None:
        """Open the path again (it was atomically replaced by a rotated ledger)."""
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def sync(self) -> None:
        os.fsync(self._fd)

    def flush(self) -> None:
        """Write what is pending now (synchronously)."""
        if self._pending:
            self._write(self._take())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()
        if not self.retry_unwritten():
            log.error("usage ledger %s: %d entry(ies) could not be written before exit (%s)",
                      self.path, len(self._unwritten), self.write_error)  # fmt: skip
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        os.close(self._fd)


class FanoutSink:
    """Every record to every sink (e.g. the ledger and the operator's accounting)."""

    def __init__(self, sinks: list[UsageSink]) -> None:
        self.sinks = sinks

    def emit(self, record: UsageRecord) -> None:
        for sink in self.sinks:
            sink.emit(record)

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        for sink in self.sinks:
            sink.emit_loop_signal(signal)

    async def close(self) -> None:
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:  # one broken sink must not lose the others' records
                log.exception("closing usage sink %r failed", sink)
