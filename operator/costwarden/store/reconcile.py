"""Reconciliation: a provider's usage and cost export against the store, difference by
difference, each with its likely cause.

Inputs are the providers' own formats, as their admin APIs return them (saved to a file,
or fetched with an admin key, following ``next_page`` while ``has_more``):

- OpenAI: ``GET /v1/organization/usage/completions`` (buckets of results with
  ``input_tokens`` *including* ``input_cached_tokens``, ``output_tokens``,
  ``num_model_requests``, grouped by ``model``, ``project_id``, ``api_key_id``) and
  ``GET /v1/organization/costs`` (``amount.value`` in ``amount.currency`` by
  ``line_item`` such as ``"gpt-4.1-2025-04-14, input"``, and ``project_id``);
- Anthropic: ``GET /v1/organizations/usage_report/messages`` (``uncached_input_tokens``,
  ``cache_read_input_tokens``, ``cache_creation.ephemeral_5m_input_tokens`` and
  ``..._1h_...``, ``output_tokens``, by ``model``, ``api_key_id``, ``workspace_id``; no
  request counts) and ``GET /v1/organizations/cost_report`` (``amount``: a decimal string
  in cents, with ``cost_type``, ``model``, ``token_type``, ``description``).

Matching is by UTC day and model (dated snapshots such as ``-2025-04-14`` or
``-20250514`` are folded into their alias); the store's side is its External models of
that provider (in-cluster models are on no provider's bill). Money is compared with the
effective cost (list price less the policy's contract discount). See docs/store.md.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from costwarden.store.query import Result

PROVIDERS = {"openai": "OpenAI", "anthropic": "Anthropic"}
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def model_key(model: str) -> str:
    """A dated snapshot folded into its alias: ``gpt-4.1-2025-04-14`` -> ``gpt-4.1``,
    ``claude-sonnet-4-20250514`` -> ``claude-sonnet-4``."""
    return _SNAPSHOT.sub("", model.strip().lower())


@dataclass
class Usage:
    input: int = 0
    """Input tokens not read from a cache (nor written to one)."""
    cached_input: int = 0
    cache_creation: int = 0
    output: int = 0
    requests: int | None = 0
    """None when the provider does not count requests (Anthropic's report)."""

    def add(self, other: Usage) -> None:
        self.input += other.input
        self.cached_input += other.cached_input
        self.cache_creation += other.cache_creation
        self.output += other.output
        if self.requests is None or other.requests is None:
            self.requests = None
        else:
            self.requests += other.requests


@dataclass
class Export:
    """What the provider reported, keyed by (day, model) and by (day, model, key)."""

    usage: dict[tuple[date, str], Usage] = field(default_factory=dict)
    by_key: dict[tuple[date, str, str], Usage] = field(default_factory=dict)
    cost: dict[tuple[date, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    unmetered: dict[tuple[date, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    """Charges with no token usage behind them (tool calls, storage, ...), by line item."""
    pages: int = 0

    def add_usage(self, day: date, model: str, key: str, usage: Usage) -> None:
        model = model_key(model)
        self.usage.setdefault((day, model), Usage()).add(usage)
        if key:
            self.by_key.setdefault((day, model, key), Usage()).add(usage)


def load_pages(path: Path) -> list[dict[str, Any]]:
    """Pages saved from the API: one page object, a JSON list of pages, or JSON Lines.
    Numbers are read as Decimals (``amount.value`` is money)."""
    text = path.read_text()
    try:
        data = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError:
        data = [json.loads(line, parse_float=Decimal) for line in text.splitlines() if line.strip()]
    pages = data if isinstance(data, list) else data.get("pages", [data])
    for number, page in enumerate(pages, 1):
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise ValueError(f"{path}: page {number} is not an API page (no data list)")
    return pages


def _day_of_unix(value: Any) -> date:
    return datetime.fromtimestamp(int(value), UTC).date()


def _day_of_rfc3339(value: Any) -> date:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC).date()


def _int(value: Any) -> int:
    return int(value or 0)


def read_openai(pages: Iterable[Mapping[str, Any]], export: Export) -> None:
    for page in pages:
        export.pages += 1
        for bucket in page.get("data", []):
            day = _day_of_unix(bucket["start_time"])
            for result in bucket.get("results", []):
                kind = str(result.get("object", ""))
                if kind.endswith("usage.completions.result"):
                    total_in = _int(result.get("input_tokens"))
                    cached = _int(result.get("input_cached_tokens"))
                    usage = Usage(
                        input=total_in - cached, cached_input=cached,
                        output=_int(result.get("output_tokens")),
                        requests=_int(result.get("num_model_requests")),
                    )  # fmt: skip
                    key = result.get("api_key_id") or result.get("project_id") or ""
                    export.add_usage(day, str(result.get("model") or "unknown"), str(key), usage)
                elif kind.endswith("costs.result"):
                    amount = result.get("amount") or {}
                    currency = str(amount.get("currency", "usd")).lower()
                    if currency != "usd":
                        raise ValueError(f"cost in {currency}: only USD is reconciled")
                    value = Decimal(str(amount.get("value", 0)))
                    item = str(result.get("line_item") or "")
                    model = item.split(",", 1)[0].strip() if "," in item else ""
                    if model:
                        export.cost[(day, model_key(model))] += value
                    else:
                        export.unmetered[(day, item or "(no line item)")] += value


def read_anthropic(pages: Iterable[Mapping[str, Any]], export: Export) -> None:
    for page in pages:
        export.pages += 1
        for bucket in page.get("data", []):
            day = _day_of_rfc3339(bucket["starting_at"])
            for result in bucket.get("results", []):
                if "amount" in result:  # cost report: a decimal string in cents
                    currency = str(result.get("currency", "USD")).upper()
                    if currency != "USD":
                        raise ValueError(f"cost in {currency}: only USD is reconciled")
                    value = Decimal(str(result["amount"])) / 100
                    model = str(result.get("model") or "")
                    if result.get("cost_type", "tokens") == "tokens" and model:
                        export.cost[(day, model_key(model))] += value
                    else:
                        label = str(result.get("description") or result.get("cost_type") or "")
                        export.unmetered[(day, label or "(no description)")] += value
                else:
                    creation = result.get("cache_creation") or {}
                    usage = Usage(
                        input=_int(result.get("uncached_input_tokens")),
                        cached_input=_int(result.get("cache_read_input_tokens")),
                        cache_creation=_int(creation.get("ephemeral_5m_input_tokens"))
                        + _int(creation.get("ephemeral_1h_input_tokens")),
                        output=_int(result.get("output_tokens")),
                        requests=None,
                    )
                    key = result.get("api_key_id") or result.get("workspace_id") or ""
                    export.add_usage(day, str(result.get("model") or "unknown"), str(key), usage)


READERS = {"openai": read_openai, "anthropic": read_anthropic}


@dataclass
class Metered:
    usage: Usage = field(default_factory=Usage)
    cost: Decimal = Decimal(0)


def metered(con: duckdb.DuckDBPyConnection, provider: str) -> dict[tuple[date, str], Metered]:
    """The store's External calls to ``provider`` with reported usage, by day and model."""
    rows = con.execute(
        """
        SELECT CAST(time AT TIME ZONE 'UTC' AS DATE) AS day,
               coalesce(nullif(upstream_model, ''), served_model) AS model,
               sum(input_tokens)::BIGINT, sum(cached_input_tokens)::BIGINT,
               sum(cache_creation_tokens + coalesce(cache_creation_1h_tokens, 0))::BIGINT,
               sum(output_tokens)::BIGINT, count(*),
               sum(cost_usd), coalesce(discount_percent, 0)
        FROM usage
        WHERE usage_reported AND provider = ? AND locality IS DISTINCT FROM 'InCluster'
        GROUP BY ALL
        """,
        [PROVIDERS[provider]],
    ).fetchall()
    found: dict[tuple[date, str], Metered] = {}
    for day, model, inp, cached, creation, out, calls, cost, discount in rows:
        entry = found.setdefault((day, model_key(model)), Metered())
        entry.usage.add(Usage(inp, cached, creation, out, calls))
        # In Python: DuckDB divides decimals in floating point; money stays exact here.
        entry.cost += Decimal(cost or 0) * (100 - Decimal(discount)) / 100
    return found


@dataclass(frozen=True)
class Difference:
    day: date
    model: str
    metric: str
    provider: Any
    costwarden: Any
    cause: str
    key: str = ""

    @property
    def delta(self) -> Any:
        return (self.provider or 0) - (self.costwarden or 0)


TOKEN_METRICS = ("input", "cached_input", "cache_creation", "output")


def compare(
    export: Export,
    store: Mapping[tuple[date, str], Metered],
    *,
    gateway_keys: Sequence[str] = (),
    tolerance_tokens: int = 0,
    tolerance_usd: Decimal = Decimal("0.01"),
) -> list[Difference]:
    """Every difference beyond the tolerances, with its likely cause."""
    found: list[Difference] = []
    keys = sorted(set(export.usage) | set(store) | set(export.cost))
    for day, model in keys:
        theirs = export.usage.get((day, model))
        ours = store.get((day, model), Metered())
        token_gap = False
        around = _around(export, day, model, gateway_keys)
        for metric in (*TOKEN_METRICS, "requests"):
            p = getattr(theirs, metric) if theirs is not None else 0
            c = getattr(ours.usage, metric)
            if p is None or abs(p - c) <= (0 if metric == "requests" else tolerance_tokens):
                continue
            token_gap = True
            found.append(
                Difference(day, model, metric, p, c, _token_cause(p, c, model, ours, around))
            )
        for key, usage in around:
            found.append(Difference(
                day, model, "tokens_by_key", _total(usage), 0,
                f"calls around the gateway: API key {key} is not one the gateway uses "
                f"(--gateway-key) and spent {_total(usage)} tokens of {model} this day",
                key=key,
            ))  # fmt: skip
        if (day, model) in export.cost:
            billed = export.cost[(day, model)]
            if abs(billed - ours.cost) > tolerance_usd:
                if token_gap:
                    cause = "follows from the token difference above"
                elif ours.cost:
                    ratio = (billed / ours.cost).quantize(Decimal("0.0001"))
                    cause = (
                        f"price change: the tokens match but the provider charged "
                        f"{ratio}x what the policy's prices (less its discount) give; update "
                        f"the RoutingPolicy's pricing or discountPercent for {model}"
                    )
                else:
                    cause = "billed without any metered call: calls around the gateway"
                found.append(Difference(day, model, "cost_usd", billed, ours.cost, cause))
    for (day, item), amount in sorted(export.unmetered.items()):
        if abs(amount) > tolerance_usd:
            found.append(Difference(
                day, "", "unmetered_usd", amount, Decimal(0),
                f"unmetered charge type: {item!r} is billed per the provider's own meter "
                "(tool calls, storage, fine-tuning, ...), not per token through the gateway",
                key=item,
            ))  # fmt: skip
    return found


def _around(
    export: Export, day: date, model: str, gateway_keys: Sequence[str]
) -> list[tuple[str, Usage]]:
    if not gateway_keys:
        return []
    return [
        (key, usage)
        for (d, m, key), usage in sorted(export.by_key.items())
        if d == day and m == model and key not in gateway_keys and _total(usage)
    ]


def _total(usage: Usage) -> int:
    return usage.input + usage.cached_input + usage.cache_creation + usage.output


def _token_cause(
    provider: int, ours: int, model: str, metered_: Metered, around: list[tuple[str, Usage]]
) -> str:
    if provider > ours:
        names = ", ".join(key for key, _ in around)
        keys = f" (API key(s) {names}, not the gateway's)" if around else ""
        if not metered_.usage.requests and not _total(metered_.usage):
            return (
                f"calls around the gateway: the provider served {model} but no call to it "
                f"went through costwarden{keys}"
            )
        if around:
            return f"calls around the gateway: made with API key(s) {names}, not the gateway's"
        return (
            "calls around the gateway (a provider key used directly, not through the "
            "gateway): the provider counted more than costwarden metered"
        )
    return (
        "costwarden metered more than the provider reports: the provider's report is not "
        "final yet (usage appears hours later), or calls failed after metering"
    )


def as_result(differences: Sequence[Difference]) -> Result:
    result = Result(
        ["day", "model", "key", "metric", "provider", "costwarden", "difference", "likely_cause"]
    )
    for d in differences:
        result.rows.append(
            [
                d.day.isoformat(),
                d.model,
                d.key,
                d.metric,
                d.provider,
                d.costwarden,
                d.delta,
                d.cause,
            ]
        )
    return result


# --- fetching from the providers' admin APIs -------------------------------------------

OPENAI_BASE = "https://api.openai.com"
ANTHROPIC_BASE = "https://api.anthropic.com"
MAX_PAGES = 1000


def fetch(
    provider: str,
    admin_key: str,
    start: datetime,
    end: datetime,
    *,
    base_url: str | None = None,
    transport: Any = None,
) -> list[dict[str, Any]]:
    """Usage and cost pages for [start, end), every page (``next_page`` while ``has_more``)."""
    import httpx

    if provider == "openai":
        base = base_url or OPENAI_BASE
        headers = {"Authorization": f"Bearer {admin_key}"}
        common: list[tuple[str, str]] = [
            ("start_time", str(int(start.timestamp()))), ("end_time", str(int(end.timestamp()))),
            ("bucket_width", "1d"),
        ]  # fmt: skip
        requests = [
            ("/v1/organization/usage/completions",
             [*common, ("group_by", "model"), ("group_by", "api_key_id"), ("limit", "31")]),
            ("/v1/organization/costs",
             [*common, ("group_by", "line_item"), ("group_by", "project_id"), ("limit", "31")]),
        ]  # fmt: skip
    elif provider == "anthropic":
        base = base_url or ANTHROPIC_BASE
        headers = {"x-api-key": admin_key, "anthropic-version": "2023-06-01"}
        common = [
            ("starting_at", start.strftime("%Y-%m-%dT%H:%M:%SZ")),
            ("ending_at", end.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ]
        requests = [
            ("/v1/organizations/usage_report/messages",
             [*common, ("bucket_width", "1d"), ("group_by[]", "model"),
              ("group_by[]", "api_key_id"), ("limit", "31")]),
            ("/v1/organizations/cost_report", [*common, ("group_by[]", "description")]),
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown provider {provider!r}")
    pages: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60, transport=transport) as client:
        for path, params in requests:
            token: str | None = None
            for _ in range(MAX_PAGES):
                query: list[tuple[str, str | int | float | bool | None]] = [*params]
                if token:
                    query.append(("page", token))
                response = client.get(path, params=query)
                if response.status_code != 200:
                    # The body may echo the request, never the key: print status and path.
                    raise RuntimeError(f"{provider} {path}: HTTP {response.status_code}")
                page = json.loads(response.text, parse_float=Decimal)
                pages.append(page)
                if not page.get("has_more"):
                    break
                token = page.get("next_page")
                if not token:
                    raise RuntimeError(f"{provider} {path}: has_more without next_page")
            else:
                raise RuntimeError(f"{provider} {path}: more than {MAX_PAGES} pages")
    return pages


__all__ = [
    "READERS",
    "Difference",
    "Export",
    "as_result",
    "compare",
    "fetch",
    "load_pages",
    "metered",
    "model_key",
]  # fmt: skip
