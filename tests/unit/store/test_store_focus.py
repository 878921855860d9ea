"""The FOCUS export checked against the FOCUS 1.2 column rules: required columns present
with their types, non-null rules, ChargePeriod within BillingPeriod, the cost
relationships, and input and output tokens as separate SKU meters."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from costwarden.cli import main
from costwarden.store.writer import StoreEntry, UsageStore
from tests.unit.store.conftest import CLAUDE, GPT, make_record

# FOCUS 1.2: the columns a usage-only, pay-as-you-go dataset must carry, and their types
# (Decimal, DateTime, String); those that must never be null (for Usage rows that are not
# corrections) are marked True.
REQUIRED: dict[str, tuple[str, bool]] = {
    "BilledCost": ("Decimal", True),
    "BillingAccountId": ("String", True),
    "BillingAccountName": ("String", False),
    "BillingCurrency": ("String", True),
    "BillingPeriodEnd": ("DateTime", True),
    "BillingPeriodStart": ("DateTime", True),
    "ChargeCategory": ("String", True),
    "ChargeClass": ("String", False),
    "ChargeDescription": ("String", True),
    "ChargePeriodEnd": ("DateTime", True),
    "ChargePeriodStart": ("DateTime", True),
    "ConsumedQuantity": ("Decimal", True),
    "ConsumedUnit": ("String", True),
    "ContractedCost": ("Decimal", True),
    "ContractedUnitPrice": ("Decimal", True),
    "EffectiveCost": ("Decimal", True),
    "InvoiceIssuerName": ("String", True),
    "ListCost": ("Decimal", True),
    "ListUnitPrice": ("Decimal", True),
    "PricingCategory": ("String", True),
    "PricingQuantity": ("Decimal", True),
    "PricingUnit": ("String", True),
    "ProviderName": ("String", True),
    "PublisherName": ("String", True),
    "ServiceCategory": ("String", True),
    "ServiceName": ("String", True),
    "SkuId": ("String", True),
    "SkuMeter": ("String", True),
    "SkuPriceId": ("String", True),
}
SERVICE_CATEGORIES = {"AI and Machine Learning"}
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}


def _type(data_type: pa.DataType) -> str:
    if pa.types.is_decimal(data_type):
        return "Decimal"
    if pa.types.is_timestamp(data_type):
        assert data_type.tz == "UTC"
        return "DateTime"
    return "String" if pa.types.is_string(data_type) else str(data_type)


def check_focus(table: pa.Table) -> list[dict[str, Any]]:
    """Assert the FOCUS 1.2 rules on a table; returns its rows."""
    for name, (kind, _) in REQUIRED.items():
        assert name in table.column_names, f"missing FOCUS column {name}"
        assert _type(table.schema.field(name).type) == kind, name
    for name in table.column_names:
        assert name in REQUIRED or name[0].isupper() or name.startswith("x_"), name
        if name not in REQUIRED and name.startswith("x") and not name.startswith("x_"):
            pytest.fail(f"custom column {name} lacks the x_ prefix")
    rows = table.to_pylist()
    for row in rows:
        for name, (_, not_null) in REQUIRED.items():
            if not_null:
                assert row[name] is not None, f"{name} is null in {row}"
        assert row["ChargeCategory"] in CHARGE_CATEGORIES
        assert row["ChargeClass"] in (None, "Correction")
        assert row["ServiceCategory"] in SERVICE_CATEGORIES
        assert row["BillingCurrency"] == "USD"
        assert row["BillingPeriodStart"] <= row["ChargePeriodStart"] < row["ChargePeriodEnd"]
        assert row["ChargePeriodEnd"] <= row["BillingPeriodEnd"]
        assert row["ListCost"] == row["ListUnitPrice"] * row["PricingQuantity"]
        assert row["ContractedCost"] == row["ContractedUnitPrice"] * row["PricingQuantity"]
        assert row["EffectiveCost"] <= row["ContractedCost"] <= row["ListCost"]
        assert row["BilledCost"] == row["EffectiveCost"]  # nothing amortized
        assert min(row["ListCost"], row["ConsumedQuantity"], row["PricingQuantity"]) >= 0
        json.loads(row["Tags"])
        json.loads(row["SkuPriceDetails"])
    return rows


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    s = UsageStore(root)
    day1, day2 = datetime(2026, 11, 3, 9, tzinfo=UTC), datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
    s.write("gw#1", "team-a/a", [
        StoreEntry(1, make_record(when=day1, inp=10_000, out=1_000, cached=2_000), GPT, "External"),
        StoreEntry(2, make_record(when=day1, inp=5_000, out=500), GPT, "External"),
        StoreEntry(3, make_record(when=day2, inp=1_000, out=100,
                                  labels={"repository": "acme/web"}), GPT, "External"),
    ])  # fmt: skip
    s.write("gw#1", "team-b/b", [
        StoreEntry(4, make_record(team="team-b/b", model="claude-sonnet-4", provider="Anthropic",
                                  pricing=CLAUDE, inp=100, out=50, creation=4_000), CLAUDE),
        # October and December: outside the billing period
        StoreEntry(5, make_record(team="team-b/b", when=datetime(2026, 10, 31, 23, tzinfo=UTC))),
        StoreEntry(6, make_record(team="team-b/b", when=datetime(2026, 12, 1, tzinfo=UTC))),
    ])  # fmt: skip
    return root


def test_focus_file_follows_the_column_rules_and_costs_are_exact(
    store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "focus.parquet"
    assert main(["export", "focus", "--store", str(store), "--period", "2026-11",
                 "--file", str(out)]) == 0  # fmt: skip
    table = pq.read_table(out)
    assert table.schema.metadata[b"FocusVersion"] == b"1.2"
    assert (
        json.loads(Path(f"{out}.metadata.json").read_text())["Schemas"][0]["FocusVersion"] == "1.2"
    )
    rows = check_focus(table)

    assert {r["BillingPeriodStart"] for r in rows} == {datetime(2026, 11, 1, tzinfo=UTC)}
    assert {r["BillingPeriodEnd"] for r in rows} == {datetime(2026, 12, 1, tzinfo=UTC)}
    gpt_day1 = {r["SkuMeter"]: r for r in rows
                if r["x_Team"] == "team-a/a" and r["ChargePeriodStart"].day == 3}  # fmt: skip
    assert set(gpt_day1) == {"Input Tokens", "Cached Input Tokens", "Output Tokens"}
    assert gpt_day1["Input Tokens"]["ConsumedQuantity"] == 15_000
    assert gpt_day1["Input Tokens"]["ConsumedUnit"] == "Tokens"
    assert gpt_day1["Input Tokens"]["ListUnitPrice"] == Decimal("0.000002")
    assert gpt_day1["Input Tokens"]["ListCost"] == Decimal("0.03")
    assert gpt_day1["Output Tokens"]["ListCost"] == Decimal("0.012")
    assert gpt_day1["Cached Input Tokens"]["ListCost"] == Decimal("0.001")
    # the policy's 10 % discount: contracted = effective = billed = 90 % of list
    assert gpt_day1["Output Tokens"]["EffectiveCost"] == Decimal("0.0108")
    assert gpt_day1["Output Tokens"]["ContractedUnitPrice"] == Decimal("0.0000072")
    assert gpt_day1["Input Tokens"]["ServiceSubcategory"] == "Generative AI"
    # every record's cost is in the file exactly once (list cost), November only
    november = (
        Decimal("0.03")
        + Decimal("0.012")
        + Decimal("0.001")
        + Decimal("0.0028")
        + (100 * Decimal(3) + 50 * Decimal(15) + 4_000 * Decimal("3.75")) / 1_000_000
    )
    assert sum(r["ListCost"] for r in rows) == november
    claude = [r for r in rows if r["x_Team"] == "team-b/b"]
    assert {r["SkuMeter"] for r in claude} == {
        "Input Tokens",
        "Cache Write Tokens",
        "Output Tokens",
    }
    assert {r["ProviderName"] for r in claude} == {"Anthropic"}
    assert all(r["EffectiveCost"] == r["ListCost"] for r in claude)  # no discount declared
    tagged = [r for r in rows if r["ChargePeriodStart"].day == 30]
    assert json.loads(tagged[0]["Tags"])["repository"] == "acme/web"


def test_csv_export_has_iso_dates_and_exact_decimals(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "focus.csv"
    assert main(["export", "focus", "--store", str(store), "--period", "2026-11",
                 "--file", str(out), "--format", "csv"]) == 0  # fmt: skip
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(REQUIRED) <= set(rows[0])
    assert rows[0]["ChargePeriodStart"].endswith("Z")
    assert all("e" not in r["ListUnitPrice"].lower() for r in rows)  # no exponent, no float
    total = sum(Decimal(r["ListCost"]) for r in rows)
    assert total == sum(Decimal(r["ListCost"]) for r in pq.read_table(
        _parquet(store, tmp_path)).to_pylist())  # fmt: skip


def _parquet(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "again.parquet"
    main(["export", "focus", "--store", str(store), "--period", "2026-11", "--file", str(out)])
    return out


def test_a_period_is_required(store: Path) -> None:
    with pytest.raises(SystemExit, match="billing period"):
        main(["export", "focus", "--store", str(store)])


def test_1h_cache_writes_are_their_own_meter_and_old_part_files_still_read(
    tmp_path: Path,
) -> None:
    """A record with 1-hour cache writes gets a "Cache Write 1h Tokens" row at the 1-hour
    price; a part file written before the column existed (only the old columns) still
    reads, its rows with no 1-hour writes."""
    from costwarden.api.accounting import TokenUsage
    from costwarden.store import query
    from costwarden.store.focus import focus_rows
    from costwarden.store.schema import Pricing

    priced = Pricing(Decimal(3), Decimal(15), Decimal("0.3"), Decimal("3.75"),
                     cache_write_1h=Decimal(6))  # fmt: skip
    when = datetime(2026, 11, 3, 9, tzinfo=UTC)
    record = make_record(team="team-b/b", model="claude-sonnet-4", provider="Anthropic",
                         pricing=CLAUDE, when=when, inp=100, out=50)  # fmt: skip
    tokens = TokenUsage(input=100, output=50, cache_creation=0, cache_creation_1h=2_000)
    cost = (100 * Decimal(3) + 50 * Decimal(15) + 2_000 * Decimal(6)) / 1_000_000
    record = record.model_copy(update={"tokens": tokens, "cost_usd": cost,
                                       "service_tier": "standard"})  # fmt: skip
    root = tmp_path / "store"
    UsageStore(root).write("gw#1", "team-b/b", [StoreEntry(1, record, priced, "External")])
    # The same kind of file without the new columns, as an older operator wrote it.
    old_root = tmp_path / "old"
    UsageStore(old_root).write("gw#1", "team-b/b", [
        StoreEntry(1, make_record(team="team-b/b", when=when), GPT, "External")])  # fmt: skip
    for part in old_root.rglob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(list(query.ADDED_COLUMNS)), part)

    november = query.Period.parse("2026-11")
    rows = focus_rows(query.connect(root, november), november)
    one_hour = [r for r in rows if r["SkuMeter"] == "Cache Write 1h Tokens"]
    assert len(one_hour) == 1
    assert one_hour[0]["ConsumedQuantity"] == 2_000
    assert one_hour[0]["ListUnitPrice"] == Decimal("0.000006")
    assert sum(r["ListCost"] for r in rows) == cost
    assert query.connect(root).execute("SELECT service_tier FROM usage").fetchall() == [
        ("standard",)
    ]

    old_rows = focus_rows(query.connect(old_root, november), november)
    assert old_rows
    assert all(r["SkuMeter"] != "Cache Write 1h Tokens" for r in old_rows)
