"""Writing acknowledged usage to the store exactly once.

The operator's ingestion applies a batch to a team's books (the API server) and only then
acknowledges it; a gateway re-sends a batch until it is acknowledged. The store is written
*after* the books and *before* the acknowledgement, so:

- a crash between the books and the store: the gateway re-sends, the books see
  duplicates, but the store has not seen these entries and writes them now;
- a crash after the store write: the re-sent entries are found in the store and skipped.

"Found in the store" is decided from file names alone: a part file of (source, team, day)
named ``...-<first>-<last>`` holds *every* entry of that source, team and day with a
sequence number in ``[first, last]`` from one batch (an entry's day is its own time, the
same on every re-send), so an entry is written iff its seq falls in the range of a file
of its (source, team, day). The ranges are read from the directory once per team and
process, then kept in memory. A file is written under a temporary name and renamed, so a
reader or a crash never sees half a file.

Only the leader writes (only the leader applies batches). During a leadership handover a
batch still in flight on the old leader could race a re-send on the new one; both write
the same rows, and ``costwarden report`` counts a record id once (query.py), so the
figures stay exact even then.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from costwarden.store.location import locate
from costwarden.store.schema import (
    Pricing,
    day_of,
    file_name,
    parse_file_name,
    source_token,
    table_of,
    team_partition,
    values_of,
)

log = logging.getLogger(__name__)

KEEP_RANGES = timedelta(days=36)
"""How long the written ranges of a day are remembered: ingestion refuses records older
than 35 days (accounting.trust.GATEWAY_MAX_AGE), so no re-send can reach an older day."""
OUTCOMES_DIR = "outcomes"
OUTCOME_SCHEMA = pa.schema(
    [
        ("repository", pa.string()),
        ("change", pa.string()),
        ("outcome", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
    ]
)
"""Change outcomes (api/results.py ``ChangeOutcome``), exactly these columns."""


@dataclass(frozen=True)
class StoreEntry:
    """One acknowledged record with what the store needs beside it."""

    seq: int
    record: Any
    pricing: Pricing | None = None
    locality: str = ""


class UsageStore:
    """Parquet files in a local directory or an S3-compatible bucket (``--store-dir``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.location = locate(root)
        if self.location.local:
            Path(self.location.base).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # (token, team partition) -> day -> ranges written; read from the file names once
        self._ranges: dict[tuple[str, str], dict[str, _Spans]] = {}
        self._loaded = False
        self.rows_written = 0
        self.rows_skipped = 0

    def write(self, source: str, team: str, entries: Sequence[StoreEntry]) -> int:
        """Write the entries not yet in the store; returns how many rows were written."""
        token = source_token(source)
        partition = team_partition(team)
        with self._lock:
            self._load()
            ranges = self._ranges.setdefault((token, partition), {})
            by_day: dict[str, list[StoreEntry]] = defaultdict(list)
            skipped = 0
            horizon = day_of(datetime.now(UTC) - KEEP_RANGES)
            for old in [d for d in ranges if d < horizon]:
                del ranges[old]  # ingestion refuses records this old (accounting.trust)
            for entry in entries:
                day = day_of(entry.record.time)
                spans = ranges.get(day)
                if spans is not None and spans.covers(entry.seq):
                    skipped += 1
                    continue
                by_day[day].append(entry)
            written = 0
            for day in sorted(by_day):
                chosen = sorted(by_day[day], key=lambda e: e.seq)
                first, last = chosen[0].seq, chosen[-1].seq
                rows = [values_of(e.record, source, e.seq, e.pricing, e.locality) for e in chosen]
                self._write_file(
                    (f"day={day}", f"team={partition}"), file_name(token, first, last),
                    table_of(rows),
                )  # fmt: skip
                ranges.setdefault(day, _Spans()).add(first, last)
                written += len(rows)
            self.rows_written += written
            self.rows_skipped += skipped
            return written

    def write_outcomes(self, outcomes: Iterable[Any]) -> int:
        """Append change outcomes (objects or mappings with the ChangeOutcome fields)."""
        rows = []
        for outcome in outcomes:
            get = outcome.get if isinstance(outcome, dict) else (
                lambda name, o=outcome: getattr(o, name, None)
            )  # fmt: skip
            rows.append({
                "repository": str(get("repository") or ""),
                "change": str(get("change") or ""),
                "outcome": str(getattr(get("outcome"), "value", get("outcome")) or ""),
                "time": get("time"),
                "source": str(get("source") or ""),
            })  # fmt: skip
        if not rows:
            return 0
        table = pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)
        self._write_file((OUTCOMES_DIR,), f"part-{uuid.uuid4().hex}.parquet", table)
        return len(rows)

    def _write_file(self, parts: tuple[str, ...], name: str, table: pa.Table) -> None:
        location = self.location
        if not location.local:  # one PUT: the object appears whole or not at all
            pq.write_table(
                table, location.path(*parts, name), filesystem=location.fs, compression="zstd"
            )
            return
        directory = Path(location.path(*parts))
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, compression="zstd")
        os.replace(temporary, directory / name)

    def _load(self) -> None:
        """The ranges already written, from the file names (one listing per process)."""
        if self._loaded:
            return
        for path in self.location.files():
            parts = self.location.relative(path)
            if len(parts) != 3 or not parts[0].startswith("day="):
                continue
            parsed = parse_file_name(parts[2])
            if parsed is None or not parts[1].startswith("team="):
                continue
            token, first, last = parsed
            key = (token, parts[1].removeprefix("team="))
            day = parts[0].removeprefix("day=")
            self._ranges.setdefault(key, {}).setdefault(day, _Spans()).add(first, last)
        self._loaded = True


class _Spans:
    """The sequence ranges written for one (source, team, day), and the highest seq."""

    __slots__ = ("high", "spans")

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.high = 0

    def add(self, first: int, last: int) -> None:
        self.spans.append((first, last))
        self.high = max(self.high, last)

    def covers(self, seq: int) -> bool:
        # A team's entries are written in sequence order, so nearly every entry is above
        # everything written (one comparison); only a re-send scans the ranges.
        if seq > self.high:
            return False
        return any(first <= seq <= last for first, last in self.spans)


def compact(root: str | os.PathLike[str], before: date) -> tuple[int, int]:
    """Merge each closed day's part files into one per (team, source); returns the files
    written and the files removed.

    Safe beside a running operator: only days before ``before`` are touched (pass a day
    the gateways have finished delivering, e.g. two days ago), the merged file's range
    ``[first of the first, last of the last]`` holds every entry of its source, team and
    day in that range (entries of a team are written in sequence order, so the gaps
    between the merged ranges belong to other teams or days), and the originals are
    removed only after the merged file is in place. A crash between the two leaves the
    rows twice on disk, which every query counts once (query.py).
    """
    if str(root).startswith("s3://"):
        raise ValueError("compaction works on a local store directory only (for now)")
    base = Path(root)
    written = removed = 0
    for day_dir in sorted(base.glob("day=*")):
        try:
            day = date.fromisoformat(day_dir.name.removeprefix("day="))
        except ValueError:
            continue
        if day >= before:
            continue
        for team_dir in sorted(day_dir.glob("team=*")):
            groups: dict[str, list[tuple[int, int, Path]]] = defaultdict(list)
            for path in team_dir.glob("part-*.parquet"):
                parsed = parse_file_name(path.name)
                if parsed is not None:
                    groups[parsed[0]].append((parsed[1], parsed[2], path))
            for token, files in groups.items():
                if len(files) < 2:
                    continue
                files.sort()
                table = pa.concat_tables(pq.read_table(p) for _, _, p in files)
                table = table.sort_by([("seq", "ascending")])
                name = file_name(token, files[0][0], max(last for _, last, _ in files))
                temporary = team_dir / f".{name}.{uuid.uuid4().hex}.tmp"
                pq.write_table(table, temporary, compression="zstd")
                os.replace(temporary, team_dir / name)
                written += 1
                for _, _, path in files:
                    if path.name != name:
                        path.unlink()
                        removed += 1
    return written, removed


__all__ = ["OUTCOMES_DIR", "OUTCOME_SCHEMA", "StoreEntry", "UsageStore", "compact"]
