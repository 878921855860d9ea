"""Where usage records and loop signals go: the JSON Lines ledger, memory, or several.

All sinks implement :class:`costwarden.api.usage.UsageSink`; ``emit`` never blocks the
request path. The ledger's format and durability are documented in docs/ledger.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
        """At its bound (``max_bytes``): the gateway refuses new calls (503 ledger_full)
        rather than lose their usage. Nothing acknowledges a ledger-only ledger, so it is
        never rotated by the gateway (docs/ledger.md)."""
        return self.max_bytes is not None and self._size >= self.max_bytes

    def _write_all(self, data: bytes) -> None:
        self._size += len(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def append_now(self, line: bytes) -> None:
        """Write one ``\n``-terminated line at once, no fsync (``sync`` does that): for a
        consumer that numbers ledger lines and must never get ahead of the file
        (gateway/reporting.py). Do not mix with ``emit`` on the same ledger."""
        self._write_all(line)
        self._dirty = True

    def reopen(self) -> None:
        """Open the path again (it was atomically replaced by a rotated ledger)."""
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

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
