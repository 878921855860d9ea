from decimal import Decimal

from costwarden.api.catalog import PriceCatalog, default_catalog
from costwarden.api.routingpolicy import ModelBackend
from costwarden.api.teambudget import TokenUsage
from costwarden.policy.pricing import call_cost, resolve_pricing


def test_cost_is_exact_to_the_token():
    model = ModelBackend.model_validate(
        {"name": "gpt-4o-mini", "provider": "OpenAI", "endpoint": "https://api.openai.com/v1"}
    )
    pricing = resolve_pricing(model, default_catalog())
    assert pricing is not None
    cost = call_cost(TokenUsage(input=7, output=3, cached_input=11), pricing)
    # 7 x 0.15 + 3 x 0.60 + 11 x 0.075, per million
    assert cost == Decimal("0.000003675")


def test_inline_pricing_wins_and_missing_cache_prices_default_to_input():
    model = ModelBackend.model_validate(
        {
            "name": "gpt-4o-mini", "provider": "OpenAI", "endpoint": "https://x.example/v1",
            "pricing": {"inputPerMTokUSD": "1", "outputPerMTokUSD": "2"},
        }
    )  # fmt: skip
    pricing = resolve_pricing(model, default_catalog())
    assert pricing is not None
    assert pricing.cached_input_per_m_tok_usd == Decimal(1)
    assert pricing.cache_write_per_m_tok_usd == Decimal(1)


def test_unknown_model_has_no_price():
    model = ModelBackend.model_validate(
        {"name": "x", "provider": "OpenAI", "endpoint": "https://x.example/v1"}
    )
    assert resolve_pricing(model, PriceCatalog()) is None


def test_default_catalogue_loads_and_is_exact():
    catalog = default_catalog()
    assert catalog.models["claude-sonnet-4-5"].cache_write_per_m_tok_usd == Decimal("3.75")
