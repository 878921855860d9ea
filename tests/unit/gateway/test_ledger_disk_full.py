"""The ledger's volume refuses writes (ENOSPC): entries of answered calls are kept in
memory, in order, the sink reports full (new calls refused), a partial line never stays
in the file, and once the volume takes writes again (or acknowledged entries are cut
away) every entry is in the ledger with its own line number and delivered exactly once."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

import costwarden.gateway.sinks as sinks
from costwarden.gateway.reporting import OperatorReportingSink
from costwarden.gateway.sinks import FsyncPolicy, JsonlLedgerSink
from tests.unit.gateway.test_reporting import FakeOperator, record, sink, until, with_operator


class Volume:
    """A volume of ``capacity`` bytes for one file: ``os.write`` past it writes what fits
    (a short write, as write(2) does) and then fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, capacity: int) -> None:
        self.path, self.capacity = path, capacity
        real = os.write

        def write(fd: int, data: bytes | memoryview) -> int:
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                room = self.capacity - os.fstat(fd).st_size
                if room <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, bytes(data[:room]))
            return real(fd, data)

        monkeypatch.setattr(sinks.os, "write", write)


def lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a partial line was left in the ledger"
    return data.splitlines()


def test_a_full_volume_keeps_entries_in_memory_and_refuses_until_it_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ledger-only: at ENOSPC the sink is full (the gateway refuses new calls), nothing
    is dropped, no torn line stays; once room frees, the flusher writes them in order."""
    path = tmp_path / "ledger.jsonl"
    volume = Volume(monkeypatch, path, capacity=1000)

    async def run() -> None:
        ledger = JsonlLedgerSink(path, FsyncPolicy.NONE)
        for n in range(1, 11):
            ledger.emit(record(n))
        assert ledger.full
        assert ledger.unwritten > 0
        assert "No space left" in ledger.write_error
        in_file = len(lines(path))
        assert in_file + ledger.unwritten == 10
        volume.capacity = 1 << 20  # room again (another file on the volume removed)
        await until(lambda: not ledger.full, "the kept entries written")
        assert ledger.write_error == ""
        await ledger.close()

    asyncio.run(run())
    costs = [int(line.split(b'"costUSD":"')[1].split(b'"')[0]) for line in lines(path)]
    assert costs == list(range(1, 11))


def test_reporting_at_enospc_delivers_everything_once_and_frees_its_own_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With --report-to: entries the volume refused are still sent and acknowledged; once
    everything in the file is acknowledged and a rotation cannot write its new file, the
    ledger is cut to its header in place, the kept entries are written after it, calls
    resume, and a restart continues the same numbering with nothing left to send."""
    path = tmp_path / "ledger.jsonl"
    volume = Volume(monkeypatch, path, capacity=2500)

    def no_room(self: OperatorReportingSink, keep: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OperatorReportingSink, "_rotate", no_room)

    async def first(fake: FakeOperator, url: str) -> tuple[str, int]:
        reporter = sink(url, path)
        for n in range(1, 21):
            reporter.emit(record(n))
        assert reporter.full  # the volume refused some: the gateway refuses new calls
        await until(lambda: not reporter.full, "room made and the kept entries written")
        await until(lambda: not reporter.pending, "everything acknowledged")
        assert fake.seqs() == list(range(1, 21))
        assert reporter.rotations >= 1
        assert lines(path)[0].startswith(b'{"kind":"LedgerBase"')
        volume.capacity = 1 << 20
        await reporter.close()
        return reporter.source, reporter.seq

    source, last = asyncio.run(with_operator(first))

    async def second(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, path)
        assert (reporter.source, reporter.seq) == (source, last)  # numbering continues
        reporter.emit(record(21))
        await until(lambda: not reporter.pending, "the new entry acknowledged")
        assert fake.seqs() == [21]  # nothing acknowledged is sent again
        await reporter.close()

    asyncio.run(with_operator(second))
