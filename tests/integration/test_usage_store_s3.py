"""The usage store in an S3-compatible bucket (moto's server, a real HTTP S3 API): the
operator's writer writes each record once, a restarted writer skips every re-send, and
`costwarden report` and `export focus` read the bucket."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

import pyarrow.fs as pafs

from costwarden.cli import main
from costwarden.store import query
from costwarden.store.location import ENDPOINT_ENV
from costwarden.store.writer import StoreEntry, UsageStore
from costwarden.testing.processes import ManagedProcess, free_port
from tests.support.moto import moto_server
from tests.unit.store.conftest import GPT, make_record


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = free_port()
    server = ManagedProcess(
        "moto", [str(moto_server()), "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log"
    ).start()
    server.wait_http_ok(f"http://127.0.0.1:{port}/moto-api/", timeout=60)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
        ENDPOINT_ENV: f"http://127.0.0.1:{port}",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    s3 = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
        access_key="test", secret_key="test", allow_bucket_creation=True,
    )  # fmt: skip
    s3.create_dir("usage")
    yield "s3://usage/costwarden"
    server.stop()


def test_writes_to_a_bucket_are_exactly_once_and_readable(bucket: str, tmp_path: Path) -> None:
    labels = {"repository": "acme/web", "change": "1"}
    entries = [StoreEntry(n, make_record(labels=labels), GPT, "External") for n in range(1, 4)]
    store = UsageStore(bucket)
    assert store.write("sa:cw/gw#1", "team-a/a", entries) == 3
    assert store.write("sa:cw/gw#1", "team-a/a", entries) == 0
    assert UsageStore(bucket).write("sa:cw/gw#1", "team-a/a", entries) == 0  # from the listing
    store.write_outcomes([{"repository": "acme/web", "change": "1", "outcome": "merged",
                           "time": datetime(2026, 11, 4, tzinfo=UTC), "source": "ci"}])  # fmt: skip

    files = store.location.files()
    assert any("day=2026-11-03/team=team-a__a/part-" in f for f in files)
    con = query.connect(bucket, query.Period.parse("2026-11"))
    [row] = query.changes(con).as_dicts()
    assert row["merged_changes"] == 1
    assert row["cost_per_merged_change_usd"] == 3 * Decimal("0.0028")

    out = tmp_path / "focus.parquet"
    assert main(["export", "focus", "--store", bucket, "--period", "2026-11",
                 "--file", str(out)]) == 0  # fmt: skip
    import pyarrow.parquet as pq

    assert sum(r["ListCost"] for r in pq.read_table(out).to_pylist()) == Decimal("0.0084")
