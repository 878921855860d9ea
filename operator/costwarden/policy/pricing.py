"""What a call costs: tokens times prices, exact to the token (Decimal, never float)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from costwarden.api.catalog import PriceCatalog
from costwarden.api.gatewayconfig import ResolvedPricing
from costwarden.api.routingpolicy import ModelBackend
from costwarden.api.teambudget import TokenUsage

PER_MILLION = Decimal(1_000_000)


def call_cost(
    tokens: TokenUsage,
    pricing: ResolvedPricing,
    tool_calls: Mapping[str, int] | None = None,
) -> Decimal:
    """The exact USD cost of the tokens of one call, and of the provider-run tool calls
    it made (``tool_calls``: count by Responses API output item type).

    ``tokens.input`` counts only uncached input; cached reads and cache writes are priced
    at their own rates, as OpenAI and Anthropic bill them. A tool call type the pricing
    has no per-call price for costs nothing (the record still counts it).
    """
    total = (
        tokens.input * pricing.input_per_m_tok_usd
        + tokens.output * pricing.output_per_m_tok_usd
        + tokens.cached_input * pricing.cached_input_per_m_tok_usd
        + tokens.cache_creation * pricing.cache_write_per_m_tok_usd
    )
    cost = total / PER_MILLION
    if tool_calls:
        prices = pricing.tool_call_usd
        cost += sum(
            (prices[kind] * count for kind, count in tool_calls.items() if kind in prices),
            Decimal(0),
        )
    return cost


def resolve_pricing(model: ModelBackend, catalog: PriceCatalog) -> ResolvedPricing | None:
    """The model's own pricing, else the catalogue's entry for its upstream id, defaults filled."""
    declared = model.pricing or catalog.price_of(model.upstream_id)
    if declared is None:
        return None
    return ResolvedPricing(
        input_per_m_tok_usd=declared.input_per_m_tok_usd,
        output_per_m_tok_usd=declared.output_per_m_tok_usd,
        cached_input_per_m_tok_usd=(
            declared.cached_input_per_m_tok_usd
            if declared.cached_input_per_m_tok_usd is not None
            else declared.input_per_m_tok_usd
        ),
        cache_write_per_m_tok_usd=(
            declared.cache_write_per_m_tok_usd
            if declared.cache_write_per_m_tok_usd is not None
            else declared.input_per_m_tok_usd
        ),
        tool_call_usd=dict(declared.tool_call_usd or {}),
        discount_percent=model.discount_percent,
    )
