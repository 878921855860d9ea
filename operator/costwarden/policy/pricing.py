"""What a call costs: tokens times prices, exact to the token (Decimal, never float)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from costwarden.api.catalog import PriceCatalog
from costwarden.api.gatewayconfig import ResolvedPricing, ResolvedTierPricing
from costwarden.api.routingpolicy import ModelBackend, ModelPricing, Provider, TierPricing
from costwarden.api.teambudget import TokenUsage

PER_MILLION = Decimal(1_000_000)


def call_cost(
    tokens: TokenUsage,
    pricing: ResolvedPricing,
    tool_calls: Mapping[str, int] | None = None,
    service_tier: str = "",
) -> Decimal:
    """The exact USD cost of the tokens of one call, and of the provider-run tool calls
    it made (``tool_calls``: count by Responses API output item type).

    ``tokens.input`` counts only uncached input; cached reads, cache writes and 1-hour
    cache writes are priced at their own rates, as OpenAI and Anthropic bill them. Tokens
    are priced at the ``service_tier`` the answer reported when the model prices that tier
    (``serviceTiers``), else at its standard prices. A tool call type the pricing has no
    per-call price for costs nothing (the record still counts it).
    """
    # Attributes read directly (both models name them alike): this runs on every call, and
    # building pricing.rates() would double its cost.
    rates: ResolvedPricing | ResolvedTierPricing = pricing
    if service_tier and service_tier in pricing.service_tiers:
        rates = pricing.service_tiers[service_tier]
    total = (
        tokens.input * rates.input_per_m_tok_usd
        + tokens.output * rates.output_per_m_tok_usd
        + tokens.cached_input * rates.cached_input_per_m_tok_usd
        + tokens.cache_creation * rates.cache_write_per_m_tok_usd
    )
    if tokens.cache_creation_1h:  # most calls write none: skip the multiplication
        one_hour = rates.cache_write_1h_per_m_tok_usd
        if one_hour is None:  # a configuration rendered before 1-hour writes were priced
            one_hour = rates.cache_write_per_m_tok_usd
        total += tokens.cache_creation_1h * one_hour
    cost = total / PER_MILLION
    if tool_calls:
        prices = pricing.tool_call_usd
        cost += sum(
            (prices[kind] * count for kind, count in tool_calls.items() if kind in prices),
            Decimal(0),
        )
    return cost


def _rates(declared: ModelPricing | TierPricing, provider: Provider) -> dict[str, Decimal]:
    """Every token price of ``declared``, defaults filled in as ModelPricing documents them.

    A 1-hour cache write costs twice the input price at Anthropic; other providers write
    no 1-hour entries, so their 1-hour price is the cache-write price and never makes a
    reservation dearer than it was."""
    write = _or(declared.cache_write_per_m_tok_usd, declared)
    one_hour = declared.cache_write_1h_per_m_tok_usd
    if one_hour is None:
        one_hour = 2 * declared.input_per_m_tok_usd if provider is Provider.ANTHROPIC else write
    return {
        "input_per_m_tok_usd": declared.input_per_m_tok_usd,
        "output_per_m_tok_usd": declared.output_per_m_tok_usd,
        "cached_input_per_m_tok_usd": _or(declared.cached_input_per_m_tok_usd, declared),
        "cache_write_per_m_tok_usd": write,
        "cache_write_1h_per_m_tok_usd": one_hour,
    }


def _or(price: Decimal | None, declared: ModelPricing | TierPricing) -> Decimal:
    """``price``, else the input price (the default ModelPricing documents)."""
    return price if price is not None else declared.input_per_m_tok_usd


def resolve_pricing(model: ModelBackend, catalog: PriceCatalog) -> ResolvedPricing | None:
    """The model's own pricing, else the catalogue's entry for its upstream id, defaults filled."""
    declared = model.pricing or catalog.price_of(model.upstream_id)
    if declared is None:
        return None
    tiers = declared.service_tiers or {}
    return ResolvedPricing(
        **_rates(declared, model.provider),
        service_tiers={
            name: ResolvedTierPricing(**_rates(tier, model.provider))
            for name, tier in sorted(tiers.items())
        },
        tool_call_usd=dict(declared.tool_call_usd or {}),
        discount_percent=model.discount_percent,
    )
