"""DuckDB over the store's Parquet files: the answers ``costwarden report`` prints.

Every query reads a view ``usage`` (one row per record id: a record written twice during
a leadership handover is counted once, writer.py) restricted to the days asked for (only
those day partitions are read), and ``outcomes`` (change outcomes, latest per change).
Money stays DECIMAL(38, 18) inside DuckDB and comes back as Python Decimals.
"""

from __future__ import annotations

import calendar
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from costwarden.store.location import Location, locate
from costwarden.store.schema import FIXED_LABELS, SCHEMA
from costwarden.store.writer import OUTCOME_SCHEMA, OUTCOMES_DIR

TAG_COLUMNS = (
    "team", "namespace", "job", "provider", "served_model", "upstream_model", "rule",
    "task", "sensitivity", "route_reason", "outcome", *FIXED_LABELS,
)  # fmt: skip
"""Tags ``report spend --by`` groups by directly; any other name is looked up in labels."""

WASTED_OUTCOMES = ("UpstreamError", "UpstreamMalformed", "ClientDisconnected", "Refused")
STOPPING_REASONS = (
    "hard_cap_reached", "job_cost_cap_reached", "job_token_cap_reached", "retry_loop_detected",
)  # fmt: skip
"""A Job refused for one of these was stopped by costwarden (suspended or deleted): its
whole spend is work that did not finish."""


@dataclass(frozen=True)
class Period:
    """Half-open [start, end) in UTC days."""

    start: date | None = None
    end: date | None = None

    @classmethod
    def parse(cls, text: str | None) -> Period:
        """``2026-11`` (a month), ``2026-11-05`` (a day), ``2026-11-01..2026-11-15``."""
        if not text:
            return cls()
        if ".." in text:
            first, last = text.split("..", 1)
            return cls(date.fromisoformat(first), date.fromisoformat(last) + timedelta(days=1))
        if len(text) == 7:
            year, month = (int(part) for part in text.split("-"))
            days = calendar.monthrange(year, month)[1]
            return cls(date(year, month, 1), date(year, month, days) + timedelta(days=1))
        day = date.fromisoformat(text)
        return cls(day, day + timedelta(days=1))

    def days(self) -> Iterable[date] | None:
        if self.start is None or self.end is None:
            return None
        return (self.start + timedelta(days=n) for n in range((self.end - self.start).days))

    def bounds(self) -> tuple[datetime, datetime]:
        if self.start is None or self.end is None:
            raise ValueError("this needs a period (--period 2026-11)")
        return (
            datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC),
            datetime(self.end.year, self.end.month, self.end.day, tzinfo=UTC),
        )


@dataclass
class Result:
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def usage_files(location: Location, period: Period) -> list[str]:
    """The part files of the period's days (only those partitions are listed)."""
    days = period.days()
    if days is None:
        return [f for f in location.files() if _is_part(location, f)]
    found: list[str] = []
    for day in days:
        found.extend(f for f in location.files(f"day={day.isoformat()}") if _is_part(location, f))
    return sorted(found)


def _is_part(location: Location, path: str) -> bool:
    parts = location.relative(path)
    return len(parts) == 3 and parts[0].startswith("day=") and parts[2].startswith("part-")


ADDED_COLUMNS = {
    "cache_creation_1h_tokens": "BIGINT",
    "cache_write_1h_price_per_m_usd": "DECIMAL(38, 18)",
    "service_tier": "VARCHAR",
}
"""Columns added after the first release, by DuckDB type: part files written before lack
them (``union_by_name`` fills them with NULL only if one file has them)."""


def connect(
    root: str | Path, period: Period = Period(), outcomes: Sequence[str | Path] = ()
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``usage`` and ``outcomes``."""
    location = locate(root)
    con = duckdb.connect()
    files = usage_files(location, period)
    if files and location.local:
        raw = con.read_parquet(files, hive_partitioning=False, union_by_name=True)
        missing = [f"CAST(NULL AS {kind}) AS {name}" for name, kind in ADDED_COLUMNS.items()
                   if name not in raw.columns]  # fmt: skip
        if missing:  # every file predates these columns: the view still has them
            raw = raw.project(", ".join(["*", *missing]))
        con.register("usage_raw", raw)
    elif files:  # a bucket: pyarrow reads it (DuckDB's httpfs is an extension to download)
        import pyarrow.dataset as ds

        data = ds.dataset(files, filesystem=location.fs, format="parquet", schema=SCHEMA)
        con.register("usage_raw", data.to_table())
    else:
        con.register("usage_raw", pa.Table.from_pylist([], schema=SCHEMA))
    where = ""
    if period.start is not None and period.end is not None:
        start, end = period.bounds()
        where = (
            f"WHERE time >= TIMESTAMPTZ '{start.isoformat()}' "
            f"AND time < TIMESTAMPTZ '{end.isoformat()}'"
        )
    # One row per record id (a re-write during a leadership handover counts once).
    con.execute(
        f"CREATE VIEW usage AS SELECT * FROM usage_raw {where} "  # noqa: S608 - our datetimes
        "QUALIFY row_number() OVER (PARTITION BY id ORDER BY seq) = 1"
    )
    _outcomes(con, location, outcomes)
    return con


def _outcomes(
    con: duckdb.DuckDBPyConnection, location: Location, extra: Sequence[str | Path]
) -> None:
    import pyarrow.parquet as pq

    tables: list[pa.Table] = [
        pq.read_table(path, filesystem=location.fs) for path in location.files(OUTCOMES_DIR)
    ]
    for path in extra:
        tables.append(load_outcomes(Path(path)))
    table = (
        pa.concat_tables([t.cast(OUTCOME_SCHEMA) for t in tables])
        if tables
        else pa.Table.from_pylist([], schema=OUTCOME_SCHEMA)
    )
    con.register("outcomes_raw", table)
    con.execute(
        "CREATE VIEW outcomes AS SELECT repository, change, "
        "arg_max(outcome, time) AS outcome, max(time) AS time "
        "FROM outcomes_raw GROUP BY repository, change"
    )


def load_outcomes(path: Path) -> pa.Table:
    """Change outcomes from a file: JSON (a list), JSON Lines, CSV or Parquet, with the
    columns repository, change, outcome, time, source (api/results.py ChangeOutcome)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).select(OUTCOME_SCHEMA.names).cast(OUTCOME_SCHEMA)
    if path.suffix == ".csv":
        import csv

        with path.open(newline="") as handle:
            items: list[dict[str, Any]] = list(csv.DictReader(handle))
    else:
        text = path.read_text()
        stripped = text.lstrip()
        if stripped.startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = []
    for number, item in enumerate(items, 1):
        missing = [c for c in ("repository", "change", "outcome", "time") if not item.get(c)]
        if missing:
            raise ValueError(f"{path}: outcome {number} lacks {', '.join(missing)}")
        moment = datetime.fromisoformat(str(item["time"]).replace("Z", "+00:00"))
        if moment.tzinfo is None:
            raise ValueError(f"{path}: outcome {number}: time needs a UTC offset")
        rows.append({
            "repository": str(item["repository"]), "change": str(item["change"]),
            "outcome": str(item["outcome"]), "time": moment, "source": str(item.get("source", "")),
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)


def _tag_expression(tag: str) -> str:
    if tag in TAG_COLUMNS:
        return f'"{tag}"'
    if not tag.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum():
        raise ValueError(f"not a tag name: {tag!r}")
    return f"coalesce(element_at(labels, '{tag}')[1], '')"


def _run(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> Result:
    cursor = con.execute(sql, list(params))
    columns = [d[0] for d in cursor.description or []]
    return Result(columns, [list(row) for row in cursor.fetchall()])


def _tokens(alias: str = "") -> str:
    return " + ".join(
        f"{alias}{c}"
        for c in ("input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_tokens")
    )


TOKENS = _tokens()


def spend_by(con: duckdb.DuckDBPyConnection, tags: Sequence[str]) -> Result:
    """Spend, tokens and calls by one or more tags, most expensive first."""
    if not tags:
        raise ValueError("name at least one tag (--by repository)")
    expressions = [_tag_expression(tag) for tag in tags]
    select = ", ".join(f'{e} AS "{t}"' for e, t in zip(expressions, tags, strict=True))
    group = ", ".join(str(n + 1) for n in range(len(tags)))
    return _run(
        con,
        # tag names are validated (_tag_expression): columns or a checked label key
        f"SELECT {select}, count(*) AS calls, sum({TOKENS})::BIGINT AS tokens, "  # noqa: S608
        f"sum(cost_usd) AS cost_usd FROM usage GROUP BY {group} "
        f"ORDER BY cost_usd DESC, {group}",
    )


def changes(con: duckdb.DuckDBPyConnection) -> Result:
    """Per repository: changes merged (with spend), their spend and the cost per merged
    change; spend on changes closed or reverted, and on changes with no outcome yet."""
    raw = _run(
        con,
        """
        WITH spend AS (
            SELECT repository, change, sum(cost_usd) AS cost FROM usage
            WHERE change <> '' GROUP BY repository, change
        )
        SELECT s.repository,
               count(*) FILTER (WHERE o.outcome = 'merged') AS merged_changes,
               coalesce(sum(s.cost) FILTER (WHERE o.outcome = 'merged'), 0) AS merged_cost_usd,
               count(*) FILTER (WHERE o.outcome IN ('closed', 'reverted')) AS unmerged_changes,
               coalesce(sum(s.cost) FILTER (WHERE o.outcome IN ('closed', 'reverted')), 0)
                   AS unmerged_cost_usd,
               count(*) FILTER (WHERE o.outcome IS NULL) AS open_changes,
               coalesce(sum(s.cost) FILTER (WHERE o.outcome IS NULL), 0) AS open_cost_usd
        FROM spend s LEFT JOIN outcomes o
          ON o.repository = s.repository AND o.change = s.change
        GROUP BY s.repository
        """,
    )
    result = Result(
        ["repository", "merged_changes", "cost_per_merged_change_usd", "merged_cost_usd",
         "unmerged_changes", "unmerged_cost_usd", "open_changes", "open_cost_usd"]
    )  # fmt: skip
    for repo, merged, merged_cost, unmerged, unmerged_cost, open_, open_cost in raw.rows:
        per = (Decimal(merged_cost) / merged) if merged else None
        result.rows.append(
            [repo, merged, per, merged_cost, unmerged, unmerged_cost, open_, open_cost]
        )
    # Highest cost per merged change first; repositories with nothing merged last.
    result.rows.sort(key=lambda r: (r[2] is None, -(r[2] or 0), r[0]))
    return result


def waste(con: duckdb.DuckDBPyConnection) -> Result:
    """Spend on work that produced nothing, by team and category."""
    outcomes = ", ".join(f"'{o}'" for o in WASTED_OUTCOMES)
    reasons = ", ".join(f"'{r}'" for r in STOPPING_REASONS)
    return _run(
        con,
        f"""
        WITH stopped AS (
            SELECT DISTINCT namespace, job FROM usage
            WHERE job <> '' AND outcome = 'Refused' AND reason IN ({reasons})
        ),
        spend AS (SELECT repository, change, sum(cost_usd) AS cost, count(*) AS calls,
                         sum({TOKENS}) AS tokens, any_value(team) AS team
                  FROM usage WHERE change <> '' GROUP BY repository, change)
        SELECT team, category, sum(calls)::BIGINT AS calls, sum(tokens)::BIGINT AS tokens,
               sum(cost) AS cost_usd FROM (
            SELECT team, 'calls_' || outcome AS category, 1 AS calls, {TOKENS} AS tokens,
                   cost_usd AS cost FROM usage WHERE outcome IN ({outcomes})
            UNION ALL
            SELECT u.team, 'stopped_jobs', 1, {_tokens("u.")},
                   u.cost_usd FROM usage u
            JOIN stopped s ON u.namespace = s.namespace AND u.job = s.job
            UNION ALL
            SELECT sp.team, 'unmerged_changes', sp.calls, sp.tokens, sp.cost FROM spend sp
            JOIN outcomes o ON o.repository = sp.repository AND o.change = sp.change
            WHERE o.outcome IN ('closed', 'reverted')
        ) GROUP BY team, category ORDER BY cost_usd DESC, team, category
        """,  # noqa: S608 - module constants only
    )


def as_text(result: Result) -> str:
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(result.columns, widths, strict=True))]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def as_csv(result: Result) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


def as_json(result: Result) -> str:
    return (
        json.dumps([{k: _json(v) for k, v in row.items()} for row in result.as_dicts()], indent=2)
        + "\n"
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return _plain(value)
    return str(value)


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _plain(value)  # exact: a string, never a float
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


__all__ = ["Period", "Result", "changes", "connect", "load_outcomes", "spend_by", "waste"]
