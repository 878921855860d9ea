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

from costwarden.api.usage import LoopSignal, UsageRecord, UsageSink
from costwarden.supervision import Supervisor

log = logging.getLogger("costwarden.gateway.sinks")

FLUSH_SECONDS = 0.2


class FsyncPolicy(StrEnum):
    BATCH = "batch"
    """fsync after every flush (every 0.2 s at most): a node crash loses at most one batch."""
    NONE = "none"
    """Leave it to the kernel: a process crash loses at most one batch, a node crash more."""


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
    """Appends one JSON object per line to a file, in batches, from a background task.

    Lines are written with one ``write`` per batch on an ``O_APPEND`` descriptor, so
    several writers (a restarted process) never interleave within a line.
    """

    def __init__(self, path: Path, fsync: FsyncPolicy = FsyncPolicy.BATCH) -> None:
        self.path = path
        self._fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None
        """Runs the flusher (restarted with backoff should it fail); set by the gateway."""

    def emit(self, record: UsageRecord) -> None:
        self._pending.append(record.model_dump_json(by_alias=True).encode() + b"\n")
        self._ensure_task()

    def emit_loop_signal(self, signal: LoopSignal) -> None:
        self._pending.append(signal.model_dump_json(by_alias=True).encode() + b"\n")
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

    def _take(self) -> bytes:
        batch, self._pending = self._pending, []
        return b"".join(batch)

    def _write(self, data: bytes) -> None:
        self._write_all(data)
        if self._fsync is FsyncPolicy.BATCH:
            os.fsync(self._fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def append_now(self, line: bytes) -> None:
        """Write one ``\n``-terminated line at once, no fsync (``sync`` does that): for a
        consumer that numbers ledger lines and must never get ahead of the file
        (gateway/reporting.py). Do not mix with ``emit`` on the same ledger."""
        self._write_all(line)

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
