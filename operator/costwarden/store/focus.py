"""The FOCUS export: the store's usage as a FinOps FOCUS 1.2 cost and usage dataset.

One row per UTC day, team, model, price, attribution tags and *meter*: input tokens,
cached input tokens, cache-write tokens and output tokens are separate SKU rows
(``SkuMeter``), provider-run tool calls one more. Quantities are tokens
(``ConsumedUnit``/``PricingUnit`` "Tokens"), unit prices per token. Money is exact:

- ``ListUnitPrice`` = the price per 1M tokens the record was charged at / 1,000,000;
  ``ListCost`` = ``ListUnitPrice`` x ``PricingQuantity`` (what budgets count);
- ``ContractedUnitPrice`` = ``ListUnitPrice`` x (1 - discountPercent/100), the model's
  contract discount in its RoutingPolicy; ``ContractedCost`` likewise;
- ``EffectiveCost`` = ``BilledCost`` = ``ContractedCost`` (pay as you go: no commitment
  to amortize).

Custom columns are prefixed ``x_``. The FOCUS version is in the Parquet file's metadata
(``FocusVersion``) and in the metadata file written beside it (``<file>.metadata.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from costwarden import __version__
from costwarden.store.query import Period
from costwarden.store.schema import FIXED_LABELS

FOCUS_VERSION = "1.2"
MONEY = pa.decimal128(38, 18)
TS = pa.timestamp("s", tz="UTC")
PER_MILLION = Decimal(1_000_000)
HUNDRED = Decimal(100)

COLUMNS: list[tuple[str, pa.DataType]] = [
    ("BilledCost", MONEY),
    ("BillingAccountId", pa.string()),
    ("BillingAccountName", pa.string()),
    ("BillingCurrency", pa.string()),
    ("BillingPeriodEnd", TS),
    ("BillingPeriodStart", TS),
    ("ChargeCategory", pa.string()),
    ("ChargeClass", pa.string()),
    ("ChargeDescription", pa.string()),
    ("ChargeFrequency", pa.string()),
    ("ChargePeriodEnd", TS),
    ("ChargePeriodStart", TS),
    ("ConsumedQuantity", MONEY),
    ("ConsumedUnit", pa.string()),
    ("ContractedCost", MONEY),
    ("ContractedUnitPrice", MONEY),
    ("EffectiveCost", MONEY),
    ("InvoiceIssuerName", pa.string()),
    ("ListCost", MONEY),
    ("ListUnitPrice", MONEY),
    ("PricingCategory", pa.string()),
    ("PricingQuantity", MONEY),
    ("PricingUnit", pa.string()),
    ("ProviderName", pa.string()),
    ("PublisherName", pa.string()),
    ("ResourceId", pa.string()),
    ("ResourceName", pa.string()),
    ("ResourceType", pa.string()),
    ("ServiceCategory", pa.string()),
    ("ServiceName", pa.string()),
    ("ServiceSubcategory", pa.string()),
    ("SkuId", pa.string()),
    ("SkuMeter", pa.string()),
    ("SkuPriceDetails", pa.string()),
    ("SkuPriceId", pa.string()),
    ("SubAccountId", pa.string()),
    ("SubAccountName", pa.string()),
    ("SubAccountType", pa.string()),
    ("Tags", pa.string()),
    ("x_Team", pa.string()),
    ("x_Namespace", pa.string()),
    ("x_Model", pa.string()),
    ("x_UpstreamModel", pa.string()),
    ("x_Locality", pa.string()),
    ("x_Requests", pa.int64()),
    ("x_DiscountPercent", pa.decimal128(9, 4)),
]
FOCUS_SCHEMA = pa.schema(COLUMNS)

METERS = (
    ("Input Tokens", "input_tokens", "input_price_per_m_usd", "input"),
    ("Cached Input Tokens", "cached_input_tokens", "cached_input_price_per_m_usd", "cached-input"),
    ("Cache Write Tokens", "cache_creation_tokens", "cache_write_price_per_m_usd", "cache-write"),
    (
        "Cache Write 1h Tokens",
        "cache_creation_1h_tokens",
        "cache_write_1h_price_per_m_usd",
        "cache-write-1h",
    ),
    ("Output Tokens", "output_tokens", "output_price_per_m_usd", "output"),
)
PROVIDERS = {"OpenAI": "OpenAI", "Anthropic": "Anthropic"}


def _group_query(start: datetime, end: datetime) -> str:
    labels = ", ".join(f'"{name}"' for name in FIXED_LABELS)
    # Only the period bounds (datetimes we formatted) are interpolated.
    return f"""
        SELECT CAST(time AT TIME ZONE 'UTC' AS DATE) AS day, team, namespace, provider,
               locality, served_model, upstream_model, policy, {labels},
               input_price_per_m_usd, output_price_per_m_usd, cached_input_price_per_m_usd,
               cache_write_price_per_m_usd, cache_write_1h_price_per_m_usd, discount_percent,
               sum(input_tokens)::BIGINT AS input_tokens,
               sum(output_tokens)::BIGINT AS output_tokens,
               sum(cached_input_tokens)::BIGINT AS cached_input_tokens,
               sum(cache_creation_tokens)::BIGINT AS cache_creation_tokens,
               sum(cache_creation_1h_tokens)::BIGINT AS cache_creation_1h_tokens,
               sum(tool_calls)::BIGINT AS tool_calls, sum(tool_cost_usd) AS tool_cost_usd,
               sum(cost_usd) AS cost_usd, count(*) AS requests
        FROM usage
        WHERE usage_reported AND time >= TIMESTAMPTZ '{start.isoformat()}'
              AND time < TIMESTAMPTZ '{end.isoformat()}'
        GROUP BY ALL ORDER BY ALL
    """  # noqa: S608


def focus_rows(
    con: duckdb.DuckDBPyConnection, period: Period, *, account: str = "costwarden"
) -> list[dict[str, Any]]:
    """The FOCUS rows of ``period`` (a whole billing period, e.g. a month)."""
    start, end = period.bounds()
    cursor = con.execute(_group_query(start, end))
    names = [d[0] for d in cursor.description or []]
    rows: list[dict[str, Any]] = []
    for values in cursor.fetchall():
        group = dict(zip(names, values, strict=True))
        rows.extend(_rows_of(group, start, end, account))
    return rows


def _rows_of(
    group: dict[str, Any], start: datetime, end: datetime, account: str
) -> Iterable[dict[str, Any]]:
    day = group["day"]
    charge_start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    discount = Decimal(group["discount_percent"] or 0)
    factor = (HUNDRED - discount) / HUNDRED
    provider = str(group["provider"] or "")
    in_cluster = group["locality"] == "InCluster"
    name = "In-cluster" if in_cluster else PROVIDERS.get(provider, provider or "Unknown")
    model = str(group["upstream_model"] or group["served_model"] or "unknown")
    tags = {"costwarden.io/team": group["team"], "costwarden.io/namespace": group["namespace"]}
    tags.update({k: group[k] for k in FIXED_LABELS if group[k]})
    base = {
        "BillingAccountId": account,
        "BillingAccountName": account,
        "BillingCurrency": "USD",
        "BillingPeriodStart": start,
        "BillingPeriodEnd": end,
        "ChargeCategory": "Usage",
        "ChargeClass": None,
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": charge_start,
        "ChargePeriodEnd": charge_start + timedelta(days=1),
        "InvoiceIssuerName": name,
        "PricingCategory": "Standard",
        "ProviderName": name,
        "PublisherName": name,
        "ResourceId": f"{group['policy'] or '-'}/{group['served_model']}",
        "ResourceName": str(group["served_model"]),
        "ResourceType": "Model",
        "ServiceCategory": "AI and Machine Learning",
        "ServiceSubcategory": "Generative AI",
        "ServiceName": f"{name} API" if not in_cluster else "In-cluster models",
        "SubAccountId": group["team"],
        "SubAccountName": group["team"],
        "SubAccountType": "TeamBudget",
        "Tags": json.dumps(tags, sort_keys=True),
        "x_Team": group["team"],
        "x_Namespace": group["namespace"],
        "x_Model": group["served_model"],
        "x_UpstreamModel": model,
        "x_Locality": group["locality"] or None,
        "x_DiscountPercent": discount,
    }
    metered = Decimal(0)
    first = True
    for meter, quantity_column, price_column, slug in METERS:
        quantity = int(group[quantity_column] or 0)
        per_m = group[price_column]
        if quantity == 0 or per_m is None:
            continue
        unit = Decimal(per_m) / PER_MILLION
        list_cost = unit * quantity
        metered += list_cost
        yield _row(
            base, meter, Decimal(quantity), "Tokens", unit, factor,
            sku=f"{provider.lower() or 'model'}:{model}",
            price_id=f"{model}:{slug}:{_plain(per_m)}",
            description=f"{quantity} {meter.lower()} of {model} for {group['team']}",
            requests=int(group["requests"]) if first else 0,
        )  # fmt: skip
        first = False
    rest = Decimal(group["cost_usd"]) - metered
    if rest:
        # Provider-run tool calls (or usage the store has no prices for): one row whose
        # quantity is the calls and whose unit price is exact when the calls divide it.
        calls = int(group["tool_calls"] or 0)
        amount, unit_name, unit = Decimal(1), "Charges", rest
        if calls and (rest / calls) * calls == rest:
            amount, unit_name, unit = Decimal(calls), "Requests", rest / calls
        yield _row(
            base, "Tool Calls", amount, unit_name, unit, factor,
            sku=f"{provider.lower() or 'model'}:{model}", price_id=f"{model}:tool-calls",
            description=f"{calls} provider-run tool calls of {model} for {group['team']}",
            requests=int(group["requests"]) if first else 0,
        )  # fmt: skip


def _row(
    base: dict[str, Any], meter: str, quantity: Decimal, unit_name: str, unit: Decimal,
    factor: Decimal, *, sku: str, price_id: str, description: str, requests: int,
) -> dict[str, Any]:  # fmt: skip
    contracted_unit = unit * factor
    contracted = contracted_unit * quantity
    row = dict(base)
    row.update(
        ChargeDescription=description,
        ConsumedQuantity=quantity,
        ConsumedUnit=unit_name,
        PricingQuantity=quantity,
        PricingUnit=unit_name,
        ListUnitPrice=unit,
        ListCost=unit * quantity,
        ContractedUnitPrice=contracted_unit,
        ContractedCost=contracted,
        EffectiveCost=contracted,
        BilledCost=contracted,
        SkuId=sku,
        SkuMeter=meter,
        SkuPriceId=price_id,
        SkuPriceDetails=json.dumps({"x_Meter": meter, "x_Model": base["x_UpstreamModel"]}),
        x_Requests=requests,
    )
    return row


def _plain(value: Any) -> str:
    return format(Decimal(value).normalize(), "f")


def metadata(period: Period, rows: int) -> dict[str, Any]:
    """The FOCUS metadata of the export (data generator, schema and its columns)."""
    return {
        "DataGenerator": {"DataGenerator": f"costwarden {__version__}"},
        "Schemas": [
            {
                "SchemaId": f"costwarden-focus-{FOCUS_VERSION}",
                "FocusVersion": FOCUS_VERSION,
                "CreationDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "ColumnDefinition": [
                    {"ColumnName": n, "DataType": _focus_type(t)} for n, t in COLUMNS
                ],
            }
        ],
        "x_BillingPeriod": f"{period.start}..{period.end}",
        "x_Rows": rows,
    }


def _focus_type(data_type: pa.DataType) -> str:
    if pa.types.is_decimal(data_type):
        return "Decimal"
    if pa.types.is_timestamp(data_type):
        return "DateTime"
    if pa.types.is_integer(data_type):
        return "Decimal"
    return "String"


def write(rows: list[dict[str, Any]], period: Period, out: Path, fmt: str = "parquet") -> Path:
    """Write the rows (Parquet or CSV) and the metadata file beside them."""
    table = pa.Table.from_pylist(rows, schema=FOCUS_SCHEMA)
    meta = metadata(period, len(rows))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = table.replace_schema_metadata(
            {"FocusVersion": FOCUS_VERSION, "FocusMetadata": json.dumps(meta)}
        )
        pq.write_table(table, out)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        # Exact decimals as text; FOCUS dates as ISO 8601 UTC with a Z.
        columns = []
        for name, data_type in COLUMNS:
            values = table.column(name).to_pylist()
            if pa.types.is_timestamp(data_type):
                columns.append([v.strftime("%Y-%m-%dT%H:%M:%SZ") if v else None for v in values])
            elif pa.types.is_decimal(data_type):
                columns.append([_plain(v) if v is not None else None for v in values])
            else:
                columns.append(values)
        text = pa.table(dict(zip(FOCUS_SCHEMA.names, columns, strict=True)))
        pacsv.write_csv(text, out)
    else:
        raise ValueError(f"unknown format {fmt!r} (parquet or csv)")
    Path(f"{out}.metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


__all__ = ["FOCUS_SCHEMA", "FOCUS_VERSION", "focus_rows", "metadata", "write"]
