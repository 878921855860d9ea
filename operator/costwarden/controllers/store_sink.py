"""The operator's side of the usage store: acknowledged records with their prices.

Ingestion hands each team's applied entries here (controllers/ingest.py) after their
books are written and before the batch is acknowledged. The prices written beside a
record are the ones its cost was recomputed with (the pricing whose cost equals the
record's, as ingestion's check chose it), so the FOCUS export can split the cost into
input and output SKUs and apply the contract discount without knowing today's prices.
The file I/O runs in a worker thread: the accounting loop keeps acknowledging.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from typing import Any

from costwarden.accounting.ledger import Entry
from costwarden.api.gatewayconfig import GatewayConfig, ResolvedPricing
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers.ingest_trust import PriceMemory
from costwarden.policy.pricing import call_cost
from costwarden.store.schema import Pricing
from costwarden.store.writer import StoreEntry, UsageStore


class StoreSink:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.store = UsageStore(root)

    async def write(
        self,
        cursor: str,
        team: str,
        entries: list[Entry],
        config: GatewayConfig | None,
        prices: PriceMemory,
    ) -> None:
        chosen = [
            _entry(e.seq, e.record, team, config, prices) for e in entries if e.record is not None
        ]
        if not chosen:
            return
        written = await asyncio.to_thread(self.store.write, cursor, team, chosen)
        metrics.STORE_ROWS.inc(written)


def _entry(
    seq: int, record: Any, team_id: str, config: GatewayConfig | None, prices: PriceMemory
) -> StoreEntry:
    team = config.team(team_id) if config is not None else None
    if team is None or not record.served_model:
        return StoreEntry(seq, record)
    policy = config.policy(team.routing_policy) if config is not None else None
    route = policy.model(record.served_model) if policy is not None else None
    locality = str(route.locality.value) if route is not None else ""
    pricing: ResolvedPricing | None = None
    if record.usage_reported:
        candidates = prices.prices(team, record.served_model)
        tier = record.service_tier
        pricing = next(
            (p for p in candidates
             if call_cost(record.tokens, p, record.tool_calls, tier) == record.cost_usd),
            None,
        )  # fmt: skip
    elif route is not None:
        pricing = route.pricing
    priced = _pricing(pricing, record.service_tier) if pricing else None
    return StoreEntry(seq, record, priced, locality)


def _pricing(pricing: ResolvedPricing, tier: str = "") -> Pricing:
    """The prices the record was charged at: its service tier's, when the model has them."""
    discount = getattr(pricing, "discount_percent", None)
    rates = pricing.rates(tier)
    return Pricing(
        input=rates.input,
        output=rates.output,
        cached_input=rates.cached_input,
        cache_write=rates.cache_write,
        discount_percent=Decimal(discount) if discount is not None else Decimal(0),
        cache_write_1h=rates.cache_write_1h,
    )
