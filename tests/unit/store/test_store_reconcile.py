"""``costwarden reconcile``: recorded OpenAI and Anthropic exports (their published
formats, paginated) against the store; a seeded discrepancy, calls made around the
gateway with another key, is found and named, and so are a price change and an
unmetered charge type."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from costwarden.cli import main
from costwarden.store import query, reconcile
from costwarden.store.writer import StoreEntry, UsageStore
from tests.unit.store.conftest import CLAUDE, GPT, make_record

FIXTURES = Path(__file__).parent / "fixtures"
NOV3 = datetime(2026, 11, 3, 10, tzinfo=UTC)
NOV4 = datetime(2026, 11, 4, 10, tzinfo=UTC)
NOV5 = datetime(2026, 11, 5, 10, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    s = UsageStore(root)
    s.write("gw#1", "team-a/a", [
        StoreEntry(1, make_record(when=NOV3, inp=10_000, out=1_000, cached=2_000), GPT, "External"),
        StoreEntry(2, make_record(when=NOV3, inp=5_000, out=500), GPT, "External"),
        StoreEntry(3, make_record(when=NOV4, inp=1_000, out=100), GPT, "External"),
        # an in-cluster model speaking OpenAI's format is on no provider's bill
        StoreEntry(4, make_record(when=NOV4, model="llama", inp=9_999, out=9), GPT, "InCluster"),
        StoreEntry(5, make_record(when=NOV5, model="claude-sonnet-4", provider="Anthropic",
                                  pricing=CLAUDE, inp=100, out=50, creation=4_000),
                   CLAUDE, "External"),
    ])  # fmt: skip
    return root


def diffs(provider: str, store: Path, files: list[str], keys: tuple[str, ...] = ()) -> list[Any]:
    export = reconcile.Export()
    for name in files:
        reconcile.READERS[provider](reconcile.load_pages(FIXTURES / name), export)
    con = query.connect(store, query.Period.parse("2026-11"))
    return reconcile.compare(
        export, reconcile.metered(con, provider), gateway_keys=keys, tolerance_usd=Decimal("0.001")
    )


def test_openai_calls_around_the_gateway_are_found_and_named(store: Path) -> None:
    found = diffs("openai", store, ["openai-usage-completions.json", "openai-costs.json"],
                  ("key_gateway",))  # fmt: skip
    by = {(d.day.day, d.model, d.metric, d.key): d for d in found}
    inp = by[(3, "gpt-4.1", "input", "")]
    assert (inp.provider, inp.costwarden, inp.delta) == (20_000, 15_000, 5_000)
    assert "calls around the gateway" in inp.cause
    assert "key_laptop" in inp.cause
    assert by[(3, "gpt-4.1", "requests", "")].delta == 3
    assert by[(3, "gpt-4.1", "output", "")].delta == 800
    named = by[(3, "gpt-4.1", "tokens_by_key", "key_laptop")]
    assert named.provider == 5_800
    assert "key_laptop" in named.cause
    assert "token difference" in by[(3, "gpt-4.1", "cost_usd", "")].cause
    # a model nobody routed through costwarden
    o3 = by[(4, "o3", "input", "")]
    assert "no call to it went through costwarden" in o3.cause
    # tokens match on the 4th, the money does not: a price change (0.0042 vs 0.9 x 0.0028)
    price = by[(4, "gpt-4.1", "cost_usd", "")]
    assert price.provider == Decimal("0.0042")
    assert price.costwarden == Decimal("0.00252")
    assert "price change" in price.cause
    assert "1.6667x" in price.cause
    assert (4, "gpt-4.1", "input", "") not in by  # the in-cluster llama is not compared
    web = by[(4, "", "unmetered_usd", "web search tool calls")]
    assert web.provider == Decimal("0.25")
    assert "unmetered charge type" in web.cause


def test_anthropic_usage_report_pages_and_cost_report_in_cents(store: Path) -> None:
    found = diffs(
        "anthropic", store, ["anthropic-usage-messages.json", "anthropic-cost-report.json"]
    )
    by = {(d.metric, d.key): d for d in found}
    inp = by[("input", "")]
    assert (inp.provider, inp.costwarden) == (30_100, 100)  # both pages read
    assert "calls around the gateway" in inp.cause
    assert ("cache_creation", "") not in by  # 5m + 1h cache writes match the metered 4000
    assert ("requests", "") not in by  # Anthropic's report counts no requests
    cost = by[("cost_usd", "")]
    assert cost.provider == Decimal("0.13605")
    assert cost.costwarden == Decimal("0.01605")
    assert by[("unmetered_usd", "Web Search Usage")].provider == Decimal("0.05")


def test_matching_exports_show_no_difference(store: Path, tmp_path: Path) -> None:
    page = {"object": "page", "has_more": False, "next_page": None, "data": [{
        "object": "bucket", "start_time": 1793750400, "end_time": 1793836800, "results": [{
            "object": "organization.usage.completions.result", "input_tokens": 1000,
            "output_tokens": 100, "input_cached_tokens": 0, "num_model_requests": 1,
            "model": "gpt-4.1-2025-04-14"}]}]}  # fmt: skip
    (tmp_path / "usage.json").write_text(json.dumps(page))
    assert main(["reconcile", "--provider", "openai", "--from", str(tmp_path / "usage.json"),
                 "--store", str(store), "--period", "2026-11-04"]) == 0  # fmt: skip


def test_cli_prints_every_difference_and_fails(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "reconcile", "--provider", "openai", "--store", str(store), "--period", "2026-11",
        "--from", str(FIXTURES / "openai-usage-completions.json"),
        "--from", str(FIXTURES / "openai-costs.json"), "-o", "json",
    ])  # fmt: skip
    assert code == 1
    rows = json.loads(capsys.readouterr().out)
    assert any(r["metric"] == "input" and "calls around the gateway" in r["likely_cause"]
               for r in rows)  # fmt: skip
    assert all(isinstance(r["difference"], int | str) for r in rows)  # money as strings


def test_fetch_follows_next_page_and_sends_the_admin_key(store: Path) -> None:
    usage = json.loads((FIXTURES / "openai-usage-completions.json").read_text())
    costs = json.loads((FIXTURES / "openai-costs.json").read_text())
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.headers["Authorization"] == "Bearer sk-admin-test"
        if request.url.path == "/v1/organization/costs":
            return httpx.Response(200, json=costs)
        page = 1 if request.url.params.get("page") == usage[0]["next_page"] else 0
        return httpx.Response(200, json=usage[page])

    pages = reconcile.fetch(
        "openai", "sk-admin-test", datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC), transport=httpx.MockTransport(handler),
    )  # fmt: skip
    assert len(pages) == 3
    assert [r.url.params.get("page") for r in seen] == [None, usage[0]["next_page"], None]
    assert seen[0].url.params.get_list("group_by") == ["model", "api_key_id"]
    export = reconcile.Export()
    reconcile.read_openai(pages, export)
    assert export.usage[(NOV3.date(), "gpt-4.1")].input == 20_000


def test_anthropic_fetch_uses_its_headers_and_pagination() -> None:
    usage = json.loads((FIXTURES / "anthropic-usage-messages.json").read_text())
    cost = json.loads((FIXTURES / "anthropic-cost-report.json").read_text())

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-api-key"] == "sk-ant-admin-test"
        assert request.headers["anthropic-version"] == "2023-06-01"
        if request.url.path.endswith("cost_report"):
            return httpx.Response(200, json=cost)
        return httpx.Response(200, json=usage[1 if request.url.params.get("page") else 0])

    pages = reconcile.fetch(
        "anthropic", "sk-ant-admin-test", datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC), transport=httpx.MockTransport(handler),
    )  # fmt: skip
    assert len(pages) == 3


def test_an_http_error_names_no_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key sk-admin-secret"}})

    with pytest.raises(RuntimeError) as error:
        reconcile.fetch("openai", "sk-admin-secret", datetime(2026, 11, 1, tzinfo=UTC),
                        datetime(2026, 12, 1, tzinfo=UTC),
                        transport=httpx.MockTransport(handler))  # fmt: skip
    assert "401" in str(error.value)
    assert "sk-admin" not in str(error.value)


def test_model_snapshots_fold_into_their_alias() -> None:
    assert reconcile.model_key("gpt-4.1-2025-04-14") == "gpt-4.1"
    assert reconcile.model_key("claude-sonnet-4-20250514") == "claude-sonnet-4"
    assert reconcile.model_key("gpt-4.1-mini") == "gpt-4.1-mini"
