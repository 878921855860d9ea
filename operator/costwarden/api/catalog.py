"""The price catalogue: one table of model prices, shipped with the package and the chart.

A RoutingPolicy model without ``pricing`` is priced from here by its upstream model id;
the operator reads an override file when the chart mounts one (``--price-catalog``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import Field

from costwarden.api.base import WireModel
from costwarden.api.routingpolicy import ModelPricing


class PriceCatalog(WireModel):
    """Prices by upstream model id."""

    models: dict[str, ModelPricing] = Field(default_factory=dict)

    def price_of(self, upstream_model: str) -> ModelPricing | None:
        return self.models.get(upstream_model)


def default_catalog() -> PriceCatalog:
    text = resources.files("costwarden.api").joinpath("prices.yaml").read_text()
    return PriceCatalog.model_validate(yaml.safe_load(text))


def load_catalog(path: Path | None) -> PriceCatalog:
    """The catalogue at ``path`` (YAML, same shape as the built-in one), or the built-in one."""
    if path is None:
        return default_catalog()
    return PriceCatalog.model_validate(yaml.safe_load(path.read_text()) or {})
