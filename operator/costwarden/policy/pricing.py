"""What a call costs: tokens times prices, exact to the token (Decimal, never float)."""

from __future__ import annotations

from decimal import Decimal

from costwarden.api.catalog import PriceCatalog
from costwarden.api.gatewayconfig import ResolvedPricing
from costwarden.api.routingpolicy import ModelBackend
from costwarden.api.teambudget import TokenUsage

PER_MILLION = Decimal(1_000_000)


def call_cost(tokens: TokenUsage, pricing: ResolvedPricing) -> Decimal:
    """The exact USD cost of the tokens of one call.

    ``tokens.input`` counts only uncached input; cached reads and cache writes are priced
    at their own rates, as OpenAI and Anthropic bill them.
    """
    total = (
        tokens.input * pricing.input_per_m_tok_usd
        + tokens.output * pricing.output_per_m_tok_usd
        + tokens.cached_input * pricing.cached_input_per_m_tok_usd
        + tokens.cache_creation * pricing.cache_write_per_m_tok_usd
    )
    return total / PER_MILLION


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
    )
