"""The gateway configuration: the one document the operator renders and every gateway reads.

The operator writes it into a ConfigMap (key ``gateway-config.json``) whenever a TeamBudget,
a RoutingPolicy or a team's spend state changes; gateways and sidecars reload it on change.
It is versioned (``apiVersion``/``kind``) and carries a content ``revision`` so a gateway can
say which configuration served a call. Rendering is deterministic (sorted, no timestamps
beyond the spend state), so two operator replicas render byte-identical documents.

It never contains a secret: credentials are Secret references, resolved by the gateway.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from pydantic import Field

from costwarden.api.accounting import ModelSpend
from costwarden.api.attribution import Attribution
from costwarden.api.base import WireModel
from costwarden.api.meta import LabelSelector
from costwarden.api.money import Money, PlainMoney
from costwarden.api.routingpolicy import Downgrade, Locality, Provider, RoutingRule
from costwarden.api.teambudget import (
    BudgetPhase,
    Exemptions,
    HardCapEnforcement,
    LoopDetection,
    ModelCap,
    Period,
    PerJobLimits,
    TokenCaps,
    TokenUsage,
)

CONFIG_API_VERSION = "costwarden.io/v1alpha1"
CONFIG_KIND = "GatewayConfig"
CONFIG_MAP_NAME = "costwarden-gateway-config"
CONFIG_MAP_KEY = "gateway-config.json"


class TokenRates(NamedTuple):
    """USD per 1M tokens of each kind a TokenUsage counts, in one tier."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal

    def dearest_input(self) -> Decimal:
        return max(self.input, self.cached_input, self.cache_write, self.cache_write_1h)


class ResolvedTierPricing(WireModel):
    """One service tier's prices in USD per 1M tokens, every default filled in."""

    input_per_m_tok_usd: Money = Field(alias="inputPerMTokUSD")
    output_per_m_tok_usd: Money = Field(alias="outputPerMTokUSD")
    cached_input_per_m_tok_usd: Money = Field(alias="cachedInputPerMTokUSD")
    cache_write_per_m_tok_usd: Money = Field(alias="cacheWritePerMTokUSD")
    cache_write_1h_per_m_tok_usd: Money = Field(alias="cacheWrite1hPerMTokUSD")

    def rates(self) -> TokenRates:
        return TokenRates(
            self.input_per_m_tok_usd,
            self.output_per_m_tok_usd,
            self.cached_input_per_m_tok_usd,
            self.cache_write_per_m_tok_usd,
            self.cache_write_1h_per_m_tok_usd,
        )


class ResolvedPricing(WireModel):
    """Prices in USD per 1M tokens with every default filled in."""

    input_per_m_tok_usd: Money = Field(alias="inputPerMTokUSD")
    output_per_m_tok_usd: Money = Field(alias="outputPerMTokUSD")
    cached_input_per_m_tok_usd: Money = Field(alias="cachedInputPerMTokUSD")
    cache_write_per_m_tok_usd: Money = Field(alias="cacheWritePerMTokUSD")
    cache_write_1h_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cacheWrite1hPerMTokUSD",
        description="Unset only in a configuration rendered before 1-hour writes were "
        "priced: then the cache-write price.",
    )
    service_tiers: dict[str, ResolvedTierPricing] = Field(
        default_factory=dict, alias="serviceTiers"
    )
    tool_call_usd: dict[str, PlainMoney] = Field(default_factory=dict, alias="toolCallUSD")
    discount_percent: Money | None = Field(
        default=None,
        alias="discountPercent",
        description="The model's contract discount (percent), for the usage store.",
    )

    def rates(self, tier: str = "") -> TokenRates:
        """The prices of the tier an answer reported; the standard prices for a tier this
        model has no entry for (``default``, ``standard``) or none reported."""
        if tier and (priced := self.service_tiers.get(tier)) is not None:
            return priced.rates()
        return TokenRates(
            self.input_per_m_tok_usd,
            self.output_per_m_tok_usd,
            self.cached_input_per_m_tok_usd,
            self.cache_write_per_m_tok_usd,
            self.cache_write_1h_per_m_tok_usd
            if self.cache_write_1h_per_m_tok_usd is not None
            else self.cache_write_per_m_tok_usd,
        )


class CredentialRef(WireModel):
    """Where the gateway finds a provider key: a Secret key, never the key itself."""

    namespace: str
    name: str
    key: str


class ModelRoute(WireModel):
    """A model a policy may route to, ready to call."""

    name: str
    provider: Provider
    endpoint: str
    upstream_model: str
    locality: Locality
    credentials: CredentialRef | None = None
    pricing: ResolvedPricing


class PolicyConfig(WireModel):
    """A RoutingPolicy as the gateway applies it."""

    id: str = Field(description="namespace/name of the RoutingPolicy.")
    generation: int = 0
    models: list[ModelRoute]
    default_model: str
    rules: list[RoutingRule] = Field(default_factory=list)
    soft_limit_downgrades: list[Downgrade] = Field(default_factory=list)
    prompt_cache_affinity: bool = False
    default_max_output_tokens: int | None = Field(
        default=None, description="Output ceiling of calls that set none (unset: 8192)."
    )

    def model(self, name: str) -> ModelRoute | None:
        return next((m for m in self.models if m.name == name), None)


class SpendState(WireModel):
    """What the operator knew of the team's spend when it rendered this document."""

    phase: BudgetPhase = BudgetPhase.ACTIVE
    spent_usd: Money = Field(default=Decimal(0), alias="spentUSD")
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    period_start: datetime
    period_end: datetime
    models: list[ModelSpend] = Field(
        default_factory=list,
        description="Spend of the period on each model the team has a modelCaps entry for.",
    )


class TeamConfig(WireModel):
    """A TeamBudget as the gateway enforces it."""

    id: str = Field(description="namespace/name of the TeamBudget; the team's identity.")
    generation: int = 0
    namespaces: list[str] = Field(description="Namespaces of the team's workloads (resolved).")
    selector: LabelSelector | None = None
    period: Period
    hard_cap_usd: Money = Field(alias="hardCapUSD")
    soft_limit_usd: Money = Field(alias="softLimitUSD")
    token_caps: TokenCaps | None = None
    model_caps: list[ModelCap] = Field(default_factory=list)
    per_job: PerJobLimits | None = None
    on_hard_cap: HardCapEnforcement = Field(default_factory=HardCapEnforcement)
    loop_detection: LoopDetection = Field(default_factory=LoopDetection)
    exemptions: Exemptions | None = None
    routing_policy: str | None = Field(
        default=None, description="id of the PolicyConfig routing the team's calls."
    )
    spend: SpendState
    attribution: Attribution | None = Field(
        default=None,
        description="The tags ingestion records for the team (TeamBudget spec.attribution); "
        "absent when the spec leaves the default (so a gateway of the previous release still "
        "reads the document during an upgrade).",
    )

    def tags(self) -> Attribution:
        return self.attribution or Attribution()

    def selects(self, namespace: str, labels: dict[str, str]) -> bool:
        """Whether a workload in ``namespace`` with ``labels`` belongs to this team."""
        if namespace not in self.namespaces:
            return False
        return self.selector is None or self.selector.matches(labels)


class GatewayConfig(WireModel):
    """Everything a gateway needs to attribute, route, price and limit calls."""

    api_version: str = Field(default=CONFIG_API_VERSION, alias="apiVersion")
    kind: str = CONFIG_KIND
    revision: str = Field(default="", description="sha256 of the document without this field.")
    teams: list[TeamConfig] = Field(default_factory=list)
    policies: list[PolicyConfig] = Field(default_factory=list)
    allowed_provider_hosts: list[str] | None = Field(
        default=None,
        description=(
            "The provider hosts External models may reach (exact host or *.suffix), as the "
            "cluster admin set them; unset or empty allows any host. The gateway refuses to "
            "connect an External model elsewhere."
        ),
    )

    def team(self, team_id: str) -> TeamConfig | None:
        return next((t for t in self.teams if t.id == team_id), None)

    def team_for_workload(self, namespace: str, labels: dict[str, str]) -> TeamConfig | None:
        """The team a workload belongs to (policy.tenancy.attribute): a budget in the
        workload's own namespace first (the first by id if they overlap), else the
        budget the namespace consented to. ``namespaces`` are governed ones (rendered)."""
        from costwarden.policy.tenancy import attribute  # policy imports api, not back

        return attribute(self.teams, namespace, labels)

    def policy(self, policy_id: str | None) -> PolicyConfig | None:
        if policy_id is None:
            return None
        return next((p for p in self.policies if p.id == policy_id), None)
