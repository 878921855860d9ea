"""The store's columns and file layout (docs/store.md; the contract in issue 14).

Layout: ``<root>/day=YYYY-MM-DD/team=<ns>__<name>/part-<source>-<firstseq>-<lastseq>.parquet``
(Hive partitions: Spark, Trino, BigQuery and DuckDB load it unchanged). A file holds the
records of one source (a gateway's cursor key), one team and one UTC day, from one
acknowledged batch; its name says which sequence numbers it holds, which is what makes a
re-sent batch a no-op (``writer``).

Money columns are ``decimal128(38, 18)``: exact (a call's cost has at most 12 decimals:
tokens times a 6-decimal price per million), never a float.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

FIXED_LABELS = ("project", "repository", "environment", "application", "change")
"""Attribution tags with a column of their own (the contract with the attribution work);
any other label a TeamBudget declares lands in the ``labels`` map."""

MONEY = pa.decimal128(38, 18)
PRICE = pa.decimal128(38, 18)
PERCENT = pa.decimal128(9, 4)

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("team", pa.string()),
        ("namespace", pa.string()),
        ("job", pa.string()),
        ("pod", pa.string()),
        ("endpoint", pa.string()),
        ("requested_model", pa.string()),
        ("served_model", pa.string()),
        ("upstream_model", pa.string()),
        ("provider", pa.string()),
        ("rule", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cached_input_tokens", pa.int64()),
        ("cache_creation_tokens", pa.int64()),
        ("cost_usd", MONEY),
        ("task", pa.string()),
        ("sensitivity", pa.string()),
        ("route_reason", pa.string()),
        *((name, pa.string()) for name in FIXED_LABELS),
        ("labels", pa.map_(pa.string(), pa.string())),
        # Beyond the contract's columns: what the FOCUS export and reconciliation need and
        # cannot recompute later (prices change; the policy's discount too).
        ("policy", pa.string()),
        ("locality", pa.string()),
        ("usage_reported", pa.bool_()),
        ("tool_calls", pa.int64()),
        ("tool_cost_usd", MONEY),
        ("input_price_per_m_usd", PRICE),
        ("output_price_per_m_usd", PRICE),
        ("cached_input_price_per_m_usd", PRICE),
        ("cache_write_price_per_m_usd", PRICE),
        ("discount_percent", PERCENT),
        # Added with 1-hour cache writes and service tiers: part files written before have
        # none (read as NULL: query.connect adds them).
        ("cache_creation_1h_tokens", pa.int64()),
        ("cache_write_1h_price_per_m_usd", PRICE),
        ("service_tier", pa.string()),
        ("source", pa.string()),
        ("seq", pa.int64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class Pricing:
    """The prices a record was charged at (USD per 1M tokens) and the contract discount."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    discount_percent: Decimal = Decimal(0)
    cache_write_1h: Decimal | None = None
    """Absent where the pricing had no 1-hour price (such records wrote none)."""


def team_partition(team: str) -> str:
    """``ns/name`` -> ``ns__name`` (namespaces and names hold no ``_``: injective)."""
    return team.replace("/", "__") if team else "_unattributed"


def day_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


_UNSAFE = re.compile(r"[^A-Za-z0-9.]+")


def source_token(source: str) -> str:
    """A file-name-safe, injective token for a cursor key (``sa:ns/gw#replica-1``): the
    readable part for people, a hash of the whole key so two keys never share a token."""
    readable = _UNSAFE.sub("_", source)[:80].strip("_") or "source"
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return f"{readable}~{digest}"


def file_name(token: str, first: int, last: int) -> str:
    return f"part-{token}-{first}-{last}.parquet"


def parse_file_name(name: str) -> tuple[str, int, int] | None:
    """``(token, first, last)`` of a part file, None for anything else."""
    if not name.startswith("part-") or not name.endswith(".parquet"):
        return None
    stem = name[len("part-") : -len(".parquet")]
    parts = stem.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def _get(record: Any, name: str, default: Any = "") -> Any:
    """A field read defensively: the record model gains fields over time (task,
    sensitivity, route_reason come with the attribution work), the store must not care."""
    value = getattr(record, name, default)
    return default if value is None else value


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def row_of(
    record: Any, *, source: str, seq: int, pricing: Pricing | None, locality: str = ""
) -> dict[str, Any]:
    """One record as a row of :data:`SCHEMA`."""
    return dict(zip(COLUMNS, values_of(record, source, seq, pricing, locality), strict=True))


def values_of(
    record: Any, source: str, seq: int, pricing: Pricing | None, locality: str = ""
) -> tuple[Any, ...]:
    """One record's values in :data:`COLUMNS` order (tuples: the writer builds columns
    from them, twice as fast as from dicts)."""
    tokens = _get(record, "tokens", None)
    input_tokens = int(_get(tokens, "input", 0))
    output_tokens = int(_get(tokens, "output", 0))
    cached = int(_get(tokens, "cached_input", 0))
    creation = int(_get(tokens, "cache_creation", 0))
    creation_1h = int(_get(tokens, "cache_creation_1h", 0))
    cost = Decimal(_get(record, "cost_usd", Decimal(0)))
    labels: Mapping[str, str] = _get(record, "labels", {}) or {}
    tool_calls = _get(record, "tool_calls", {}) or {}
    tool_cost = Decimal(0)
    if pricing is not None:
        token_cost = (
            input_tokens * pricing.input
            + output_tokens * pricing.output
            + cached * pricing.cached_input
            + creation * pricing.cache_write
            + creation_1h * (pricing.cache_write_1h or 0)
        ) / Decimal(1_000_000)
        tool_cost = cost - token_cost  # what the per-call tool prices added (exact)
    moment: datetime = _get(record, "time", None) or datetime.now(UTC)
    return (
        _text(_get(record, "id")),
        moment.astimezone(UTC),
        _text(_get(record, "team")),
        _text(_get(record, "namespace")),
        _text(_get(record, "job")),
        _text(_get(record, "pod")),
        _text(_get(record, "endpoint")),
        _text(_get(record, "requested_model")),
        _text(_get(record, "served_model")),
        _text(_get(record, "upstream_model")),
        _text(_get(record, "provider")),
        _text(_get(record, "rule")),
        _text(_get(record, "outcome")),
        _text(_get(record, "reason")),
        input_tokens,
        output_tokens,
        cached,
        creation,
        cost,
        _text(_get(record, "task")),
        _text(_get(record, "sensitivity")),
        _text(_get(record, "route_reason")),
        *(str(labels.get(name, "")) for name in FIXED_LABELS),
        [(str(k), str(v)) for k, v in sorted(labels.items()) if k not in FIXED_LABELS],
        _text(_get(record, "policy")),
        locality,
        bool(_get(record, "usage_reported", False)),
        int(sum(int(v) for v in tool_calls.values())),
        tool_cost,
        pricing.input if pricing else None,
        pricing.output if pricing else None,
        pricing.cached_input if pricing else None,
        pricing.cache_write if pricing else None,
        pricing.discount_percent if pricing else Decimal(0),
        creation_1h,
        pricing.cache_write_1h if pricing else None,
        _text(_get(record, "service_tier")),
        source,
        seq,
    )


def table_of(rows: list[tuple[Any, ...]]) -> pa.Table:
    """A table from :func:`values_of` tuples, built column by column."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in COLUMNS]
    return pa.Table.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, SCHEMA, strict=True)],
        schema=SCHEMA,
    )
