"""The usage store's write and query throughput (rows per second) for N records.

    python benchmarks/store.py [--records 1000000] [--batch 5000] [--dir DIR]

Writes N records as the operator does (batches of up to 5,000 entries, the gateway's
largest batch, one ``UsageStore.write`` per team and batch: row conversion, Parquet
encoding with zstd, rename), spread over 10 teams, 30 days of one month and 200 changes
in 20 repositories; building the records (the gateway's work) is not timed. Then times
DuckDB queries over all N rows: spend by team, spend by repository and change, cost per
merged change (with 200 outcomes), waste, and the month's FOCUS rows; once over the files
as written (one per batch, team and day), once after ``costwarden store compact``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from costwarden.api.accounting import TokenUsage
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.store import focus, query
from costwarden.store.schema import Pricing
from costwarden.store.writer import StoreEntry, UsageStore, compact

PRICING = Pricing(Decimal("2"), Decimal("8"), Decimal("0.5"), Decimal("2"), Decimal("10"))
MONTH = datetime(2026, 11, 1, tzinfo=UTC)


def records(count: int, seed: int = 14):
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    for seq in range(1, count + 1):
        team = f"team-{seq % 10}/budget"
        inp, out = rng.randint(100, 20_000), rng.randint(10, 2_000)
        cost = (inp * PRICING.input + out * PRICING.output) / Decimal(1_000_000)
        repo = f"acme/repo-{seq % 20}"
        yield seq, team, UsageRecord(
            time=MONTH + timedelta(seconds=seq * (30 * 86400) // count),
            team=team, namespace=team.split("/")[0], job=f"job-{seq % 500}",
            pod=f"job-{seq % 500}-x", endpoint=Endpoint.CHAT_COMPLETIONS,
            requested_model="gpt-4.1", served_model="gpt-4.1", upstream_model="gpt-4.1",
            provider="OpenAI", rule="default", outcome=Outcome.OK, usage_reported=True,
            tokens=TokenUsage(input=inp, output=out), cost_usd=cost,
            labels={"repository": repo, "change": str(seq % 200), "environment": "ci"},
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="costwarden-store-bench-"))
    store = UsageStore(root)
    written, write_seconds = 0, 0.0
    batch: dict[str, list[StoreEntry]] = defaultdict(list)
    pending = 0

    def flush() -> None:
        nonlocal written, write_seconds, pending
        started = time.perf_counter()
        for team, entries in batch.items():
            written += store.write("sa:costwarden/gateway#replica-1", team, entries)
        write_seconds += time.perf_counter() - started
        batch.clear()
        pending = 0

    for seq, team, record in records(args.records):
        batch[team].append(StoreEntry(seq, record, PRICING, "External"))
        pending += 1
        if pending == args.batch:
            flush()
    flush()
    files = sum(1 for _ in root.rglob("*.parquet"))
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    store.write_outcomes(
        {"repository": f"acme/repo-{c % 20}", "change": str(c), "source": "bench",
         "outcome": "merged" if c % 3 else "closed", "time": MONTH + timedelta(days=29)}
        for c in range(200)
    )  # fmt: skip
    results: dict[str, object] = {
        "records": written, "files": files, "bytes": size,
        "write_seconds": round(write_seconds, 2),
        "write_rows_per_second": round(written / write_seconds),
    }  # fmt: skip
    period = query.Period.parse("2026-11")
    queries = {
        "spend_by_team": lambda con: query.spend_by(con, ["team"]),
        "spend_by_repository_change": lambda con: query.spend_by(con, ["repository", "change"]),
        "cost_per_merged_change": query.changes,
        "waste": query.waste,
        "focus_rows": lambda con: focus.focus_rows(con, period),
    }

    def measure(label: str) -> None:
        for name, run in queries.items():
            started = time.perf_counter()
            con = query.connect(root, period)
            output = run(con)
            seconds = time.perf_counter() - started
            rows = len(output.rows) if hasattr(output, "rows") else len(output)  # type: ignore[arg-type]
            results[f"{label}:{name}"] = {
                "seconds": round(seconds, 2), "rows_per_second": round(written / seconds),
                "result_rows": rows,
            }  # fmt: skip

    measure("as written")
    started = time.perf_counter()
    merged, removed = compact(root, date(2026, 12, 1))
    seconds = time.perf_counter() - started
    results["compact"] = {
        "seconds": round(seconds, 2), "rows_per_second": round(written / seconds),
        "files_before": removed, "files_after": merged,
    }  # fmt: skip
    measure("compacted")
    json.dump(results, sys.stdout, indent=2)
    print()
    if not args.dir:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
