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
        pricing = next(
            (p for p in candidates if call_cost(record.tokens, p, record.tool_calls)
             == record.cost_usd),
            None,
        )  # fmt: skip
    elif route is not None:
        pricing = route.pricing
    return StoreEntry(seq, record, _pricing(pricing) if pricing else None, locality)


def _pricing(pricing: ResolvedPricing) -> Pricing:
    discount = getattr(pricing, "discount_percent", None)
    return Pricing(
        input=pricing.input_per_m_tok_usd,
        output=pricing.output_per_m_tok_usd,
        cached_input=pricing.cached_input_per_m_tok_usd,
        cache_write=pricing.cache_write_per_m_tok_usd,
        discount_percent=Decimal(discount) if discount is not None else Decimal(0),
    )
