"""The store's files: layout and columns of the contract, and every record written once
whatever is re-sent, after whichever crash."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from costwarden.accounting.batch import BatchItem, UsageBatch
from costwarden.accounting.books import Books
from costwarden.accounting.trust import Checked
from costwarden.controllers.ingest import Ingestion, StoreWriteError
from costwarden.controllers.store_sink import StoreSink
from costwarden.store import query
from costwarden.store.schema import FIXED_LABELS, SCHEMA, parse_file_name, source_token
from costwarden.store.writer import StoreEntry, UsageStore
from tests.unit.store.conftest import GPT, make_record

CONTRACT = [
    "id",
    "time",
    "team",
    "namespace",
    "job",
    "pod",
    "endpoint",
    "requested_model",
    "served_model",
    "upstream_model",
    "provider",
    "rule",
    "outcome",
    "reason",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_creation_tokens",
    "cost_usd",
    "task",
    "sensitivity",
    "route_reason",
    "project",
    "repository",
    "environment",
    "application",
    "change",
    "labels",
]


def rows(root: Path) -> list[dict[str, Any]]:
    con = query.connect(root)
    cursor = con.execute("SELECT * FROM usage_raw ORDER BY seq")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def test_files_have_the_contract_layout_and_columns(tmp_path: Path) -> None:
    store = UsageStore(tmp_path)
    record = make_record(labels={"repository": "acme/web", "change": "42", "cost-center": "7"})
    store.write("sa:cw/gw#replica-1", "team-a/a", [StoreEntry(7, record, GPT, "External")])

    [path] = list(tmp_path.rglob("*.parquet"))
    relative = path.relative_to(tmp_path)
    assert relative.parts[0] == "day=2026-11-03"
    assert relative.parts[1] == "team=team-a__a"
    assert parse_file_name(relative.parts[2]) == (source_token("sa:cw/gw#replica-1"), 7, 7)
    schema = pq.read_schema(path)
    assert set(CONTRACT) <= set(schema.names)
    assert schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("cost_usd").type == pa.decimal128(38, 18)
    assert schema.field("input_tokens").type == pa.int64()
    assert schema.field("labels").type == pa.map_(pa.string(), pa.string())
    [row] = pq.read_table(path).to_pylist()
    assert row["repository"] == "acme/web"
    assert row["change"] == "42"
    assert row["labels"] == [("cost-center", "7")]  # a non-fixed label goes to the map
    assert row["cost_usd"] == record.cost_usd  # exact: 0.0028
    assert row["team"] == "team-a/a"


def test_fields_are_read_defensively_before_and_after_attribution() -> None:
    """A record without task/sensitivity/route_reason (an older gateway's) and one with
    them both make rows."""
    from costwarden.store.schema import row_of

    record = make_record()
    attribution = ("task", "sensitivity", "route_reason")
    older = SimpleNamespace(**{k: v for k, v in record.__dict__.items() if k not in attribution})
    assert row_of(older, source="s", seq=1, pricing=GPT)["task"] == ""
    later = record.model_copy(
        update={"task": "code-review", "sensitivity": "Internal", "route_reason": "rule routine"}
    )
    row = row_of(later, source="s", seq=1, pricing=GPT)
    assert (row["task"], row["sensitivity"], row["route_reason"]) == (
        "code-review", "Internal", "rule routine",
    )  # fmt: skip
    assert set(row) == set(SCHEMA.names)
    assert all(f in row for f in FIXED_LABELS)


def test_a_re_sent_batch_writes_nothing_twice(tmp_path: Path) -> None:
    entries = [StoreEntry(n, make_record(), GPT) for n in range(1, 6)]
    store = UsageStore(tmp_path)
    assert store.write("gw#1", "team-a/a", entries) == 5
    assert store.write("gw#1", "team-a/a", entries) == 0
    # a larger re-send (the gateway appended entries meanwhile): only the new ones
    more = [*entries, *(StoreEntry(n, make_record(), GPT) for n in range(6, 9))]
    assert store.write("gw#1", "team-a/a", more) == 3
    # a restarted operator knows what is written from the file names alone
    assert UsageStore(tmp_path).write("gw#1", "team-a/a", more) == 0
    assert [r["seq"] for r in rows(tmp_path)] == list(range(1, 9))


def test_a_batch_across_midnight_interleaved_loses_nothing_after_a_partial_write(
    tmp_path: Path,
) -> None:
    """Days interleave in seq order (a long call ending after a short one); a crash after
    the first day's file leaves the other day to be written on the re-send, in full."""
    midnight = datetime(2026, 11, 4, tzinfo=UTC)
    days = {1: -1, 2: -1, 3: 1, 4: -1, 5: 1, 6: 1}
    entries = [
        StoreEntry(n, make_record(when=midnight + timedelta(seconds=s)), GPT)
        for n, s in days.items()
    ]
    store = UsageStore(tmp_path)
    store.write("gw#1", "team-a/a", [e for e in entries if days[e.seq] < 0])  # day 1 only
    assert UsageStore(tmp_path).write("gw#1", "team-a/a", entries) == 3  # day 2's
    assert sorted(r["seq"] for r in rows(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_sources_and_teams_are_kept_apart(tmp_path: Path) -> None:
    store = UsageStore(tmp_path)
    entries = [StoreEntry(1, make_record(), GPT)]
    assert store.write("gw#1", "team-a/a", entries) == 1
    assert store.write("gw#2", "team-a/a", entries) == 1  # another source's seq 1
    assert store.write("gw#1", "team-b/b", [StoreEntry(1, make_record(team="team-b/b"))]) == 1


class Accountant:
    """In-memory books, as in test_ingest_isolation."""

    def __init__(self) -> None:
        self.books: dict[str, Books] = {}
        self.now = datetime.now(UTC)

    async def mutate(self, team: str, mutation: Any) -> tuple[Any, Any]:
        books = self.books.setdefault(
            team, Books.read({}, self.now - timedelta(days=400), self.now + timedelta(days=1))
        )
        applied = mutation(books, self.now)
        return SimpleNamespace(after=SimpleNamespace(phase=None)), applied

    def budget(self, team: str) -> None:
        return None


class FlakySink(StoreSink):
    """Fails its first write: the operator died between the books and the store."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = 1

    async def write(self, *args: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk went away")
        await super().write(*args)


def test_ingestion_writes_each_acknowledged_record_once_even_after_a_store_failure(
    tmp_path: Path,
) -> None:
    accountant = Accountant()
    sink = FlakySink(tmp_path)
    ingestion = Ingestion(accountant, None, None, lambda: None, None, store=sink)  # type: ignore[arg-type]
    records = [make_record(when=datetime.now(UTC) - timedelta(minutes=1)) for _ in range(3)]
    batch = UsageBatch(
        source="gw/1", items=[BatchItem(seq=n, record=r) for n, r in enumerate(records, 1)]
    )
    checked = [Checked(seq=n, team="team-a/a", record=r) for n, r in enumerate(records, 1)]

    with pytest.raises(StoreWriteError):  # not acknowledged: the gateway re-sends
        asyncio.run(ingestion.apply(batch, "sa:cw/gw#gw/1", checked))
    assert accountant.books["team-a/a"].spent == sum(r.cost_usd for r in records)
    assert rows(tmp_path) == []

    ack = asyncio.run(ingestion.apply(batch, "sa:cw/gw#gw/1", checked))
    assert ack.acked_seq == 3
    assert ack.duplicates == 3
    assert [r["id"] for r in rows(tmp_path)] == [r.id for r in records]  # ...the store catches up
    ack = asyncio.run(ingestion.apply(batch, "sa:cw/gw#gw/1", checked))
    assert len(rows(tmp_path)) == 3
    assert accountant.books["team-a/a"].spent == sum(r.cost_usd for r in records)
    total = query.connect(tmp_path).execute("SELECT sum(cost_usd) FROM usage").fetchone()
    assert total is not None
    assert Decimal(total[0]) == sum(r.cost_usd for r in records)


def test_compaction_merges_closed_days_and_keeps_writes_exactly_once(tmp_path: Path) -> None:
    from costwarden.cli import main

    store = UsageStore(tmp_path)
    batches = [[StoreEntry(n, make_record(), GPT) for n in range(b, b + 3)] for b in (1, 4, 7)]
    for entries in batches:
        store.write("gw#1", "team-a/a", entries)
    store.write("gw#1", "team-a/a", [StoreEntry(10, make_record(when=datetime.now(UTC)), GPT)])
    before = sorted(r["id"] for r in rows(tmp_path))
    today = datetime.now(UTC).date().isoformat()
    assert main(["store", "compact", "--store", str(tmp_path), "--before", today]) == 0
    day = tmp_path / "day=2026-11-03" / "team=team-a__a"
    assert [parse_file_name(p.name)[1:] for p in day.glob("*.parquet")] == [(1, 9)]  # type: ignore[index]
    assert sorted(r["id"] for r in rows(tmp_path)) == before
    # today's partition is left alone; a restarted writer still skips every re-send
    assert len(list((tmp_path / f"day={today}").rglob("*.parquet"))) == 1
    fresh = UsageStore(tmp_path)
    assert sum(fresh.write("gw#1", "team-a/a", entries) for entries in batches) == 0
    assert fresh.write("gw#1", "team-a/a", [StoreEntry(11, make_record(), GPT)]) == 1


def test_a_crash_during_compaction_counts_each_record_once(tmp_path: Path) -> None:
    from costwarden.store.writer import compact

    store = UsageStore(tmp_path)
    store.write("gw#1", "team-a/a", [StoreEntry(1, make_record(), GPT)])
    store.write("gw#1", "team-a/a", [StoreEntry(2, make_record(), GPT)])
    day = tmp_path / "day=2026-11-03" / "team=team-a__a"
    saved = {p.name: p.read_bytes() for p in day.glob("*.parquet")}
    compact(tmp_path, datetime(2026, 11, 4, tzinfo=UTC).date())
    for name, data in saved.items():  # the originals back: as if removing them never ran
        (day / name).write_bytes(data)
    assert len(list(day.glob("*.parquet"))) == 3
    count = query.connect(tmp_path).execute("SELECT count(*) FROM usage").fetchone()
    assert count == (2,)
