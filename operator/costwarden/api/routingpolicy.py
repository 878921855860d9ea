"""The RoutingPolicy kind: which model serves a call, at what price, and where it may go.

A policy declares the models a team may use (provider wire format, endpoint, credentials
by Secret reference, prices), a default model, ordered rules that match request traits
(task, requested model, prompt size, tools, sensitivity) and route to a model with
fallbacks, and the downgrades applied once a budget passes its soft limit. Confidential
work is only ever routed to in-cluster models: the API server refuses a policy that says
otherwise, and the gateway refuses a call it cannot keep inside the cluster.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from costwarden.api.base import WireModel
from costwarden.api.endpoints import ENDPOINT_RULES, MODEL_ENDPOINT_RULES
from costwarden.api.meta import Condition, SecretKeyReference
from costwarden.api.money import Money, PlainMoney
from costwarden.api.rules import CelRule

KIND = "RoutingPolicy"
PLURAL = "routingpolicies"
SINGULAR = "routingpolicy"
SHORT_NAMES = ["rp", "routing"]

MODEL_NAME_PATTERN = r"^[A-Za-z0-9]([-._:/A-Za-z0-9]*[A-Za-z0-9])?$"
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)]
TaskLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-_.a-z0-9]*)?$")]

# The endpoint's own rules (URL shape, no userinfo/query/fragment, no disguised or
# metadata address), checked in order: Python reports the first that fails, the API server
# every one. Rules that depend on locality and credentials are ModelBackend's.
ENDPOINT_RULE = ENDPOINT_RULES[0]


def _check_endpoint(value: str) -> str:
    for rule in ENDPOINT_RULES:
        if not rule.holds(value):
            raise PydanticCustomError("cel_rule", rule.message)
    return value


EndpointURL = Annotated[
    str,
    Field(min_length=1, max_length=2048),
    AfterValidator(_check_endpoint),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 2048,
            "x-kubernetes-validations": [rule.to_schema() for rule in ENDPOINT_RULES],
        }
    ),
]

MAX_MODELS = 32
MAX_RULES = 64
MAX_FALLBACKS = 4


class Provider(StrEnum):
    """The wire format the upstream speaks."""

    OPENAI = "OpenAI"
    ANTHROPIC = "Anthropic"


class Locality(StrEnum):
    """Where a model runs. Only InCluster models may serve Confidential work."""

    EXTERNAL = "External"
    IN_CLUSTER = "InCluster"


class Sensitivity(StrEnum):
    """How sensitive a call's content is, as declared by the caller (default Internal)."""

    PUBLIC = "Public"
    INTERNAL = "Internal"
    CONFIDENTIAL = "Confidential"


MAX_SERVICE_TIERS = 8
TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
"""A service tier's name as the providers report it (``flex``, ``priority``)."""


class TierPricing(WireModel):
    """Prices in USD per one million tokens of one service tier (OpenAI's ``flex`` or
    ``priority``, ...), as the provider publishes them for this model."""

    input_per_m_tok_usd: Money = Field(
        alias="inputPerMTokUSD", description="USD per 1M input tokens not read from a cache."
    )
    output_per_m_tok_usd: Money = Field(
        alias="outputPerMTokUSD", description="USD per 1M output tokens."
    )
    cached_input_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cachedInputPerMTokUSD",
        description="USD per 1M cached input tokens at this tier; default: this tier's input "
        "price.",
    )
    cache_write_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cacheWritePerMTokUSD",
        description="USD per 1M input tokens written to a prompt cache at this tier; "
        "default: this tier's input price.",
    )
    cache_write_1h_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cacheWrite1hPerMTokUSD",
        description="USD per 1M input tokens written to a 1-hour prompt cache at this tier; "
        "default: as for the model's own prices.",
    )


class ModelPricing(WireModel):
    """Prices in USD per one million tokens, as the provider bills them."""

    input_per_m_tok_usd: Money = Field(
        alias="inputPerMTokUSD", description="USD per 1M input tokens not read from a cache."
    )
    output_per_m_tok_usd: Money = Field(
        alias="outputPerMTokUSD", description="USD per 1M output tokens."
    )
    cached_input_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cachedInputPerMTokUSD",
        description="USD per 1M input tokens read from a prompt cache; default: input price.",
    )
    cache_write_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cacheWritePerMTokUSD",
        description="USD per 1M input tokens written to a prompt cache (Anthropic: the "
        "5-minute cache, 1.25x input); default: input price.",
    )
    cache_write_1h_per_m_tok_usd: Money | None = Field(
        default=None,
        alias="cacheWrite1hPerMTokUSD",
        description="USD per 1M input tokens written to Anthropic's 1-hour prompt cache "
        "(usage.cache_creation.ephemeral_1h_input_tokens); default: twice the input "
        "price for an Anthropic model, as Anthropic bills them (other providers write no "
        "1-hour entries: the cache-write price).",
    )
    service_tiers: dict[str, TierPricing] | None = Field(
        default=None,
        alias="serviceTiers",
        max_length=MAX_SERVICE_TIERS,
        json_schema_extra={"maxProperties": MAX_SERVICE_TIERS},
        description="Prices of the service tiers the provider bills differently, by the "
        "name its answers report in service_tier (OpenAI: flex, priority). A call is "
        "priced at the tier its answer reports; a tier not listed here (default, "
        "standard, ...) at the prices above. Tool calls cost the same at every tier.",
    )

    @field_validator("service_tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierPricing] | None) -> dict[str, TierPricing] | None:
        for name in tiers or {}:
            if not TIER_NAME.match(name) or name == "auto":
                raise ValueError(
                    f"service tier {name[:40]!r} must be a tier an answer reports "
                    "(lowercase letters, digits, - and _, at most 32; never auto)"
                )
        return tiers

    tool_call_usd: dict[str, PlainMoney] | None = Field(
        default=None,
        alias="toolCallUSD",
        max_length=8,
        json_schema_extra={"maxProperties": 8},
        description='USD per call (a decimal string, e.g. "0.01") of a tool the provider '
        "runs and bills per call, by the Responses API output item type (web_search_call, "
        "file_search_call, code_interpreter_call; Anthropic's server web search counts as "
        "web_search_call). A tool call with no price here costs 0 and is still counted in "
        "the usage record (toolCalls).",
    )


class ModelBackend(WireModel):
    """One model a team may be routed to."""

    name: ModelName = Field(description="The name rules and budgets use for this model.")
    provider: Provider = Field(description="Wire format of the upstream: OpenAI or Anthropic.")
    endpoint: EndpointURL = Field(
        description=(
            "Base URL of the upstream API, e.g. https://api.openai.com/v1 or "
            "http://vllm.models.svc:8000/v1: scheme://host[:port][/path], no userinfo, "
            "query or fragment, never a link-local or metadata address. An External "
            "model's host is a public DNS name or address (no loopback, private range or "
            "in-cluster name), https when it has credentials, and one of the provider "
            "hosts the cluster admin allows (if the admin set a list)."
        ),
    )
    upstream_model: ModelName | None = Field(
        default=None,
        description="The model id sent upstream; defaults to name.",
    )
    locality: Locality = Field(
        default=Locality.EXTERNAL,
        description="External (a provider outside the cluster) or InCluster.",
    )
    credentials: SecretKeyReference | None = Field(
        default=None,
        description=(
            "Secret (in the policy's namespace) holding the provider API key. Only the "
            "reference is stored; the key never appears in status, config, logs or metrics."
        ),
    )
    pricing: ModelPricing | None = Field(
        default=None,
        description=(
            "Prices for this model. Omit to use the price catalogue entry for upstreamModel "
            "(the chart ships a table of common models); required for models not in it."
        ),
    )

    discount_percent: Money | None = Field(
        default=None,
        alias="discountPercent",
        description=(
            "Contract discount off the list price, in percent (an integer or a decimal "
            'string, e.g. "12.5"; below 100, at most 4 decimals). Budgets count list '
            "prices; the FOCUS export "
            "(costwarden export focus) reports ContractedCost and EffectiveCost with it."
        ),
    )

    cel_rules = MODEL_ENDPOINT_RULES

    @field_validator("discount_percent")
    @classmethod
    def _discount_below_100(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value >= 100:
            raise ValueError("discountPercent must be below 100")
        if value is not None and value != value.quantize(Decimal("0.0001")):
            # Contracted unit prices then keep 18 decimals (the FOCUS export's precision).
            raise ValueError("discountPercent has at most 4 decimal places")
        return value

    @property
    def upstream_id(self) -> str:
        return self.upstream_model or self.name


class RuleMatch(WireModel):
    """Request traits a rule matches. Every trait given must hold; an empty match matches all."""

    tasks: list[TaskLabel] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Task labels the client sends (header X-Costwarden-Task or metadata.task), "
            "e.g. summarize, code-review."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    requested_models: list[ModelName] = Field(
        default_factory=list,
        max_length=32,
        description="Model names the client asked for.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    min_prompt_tokens: int | None = Field(
        default=None, ge=0, description="Matches prompts of at least this many (estimated) tokens."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=0, description="Matches prompts of at most this many (estimated) tokens."
    )
    has_tools: bool | None = Field(
        default=None, description="true matches calls that offer tools, false calls that do not."
    )
    sensitivities: list[Sensitivity] = Field(
        default_factory=list,
        max_length=3,
        description="Sensitivity levels matched (header X-Costwarden-Sensitivity).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    cel_rules = (
        CelRule(
            cel=(
                "!has(self.minPromptTokens) || !has(self.maxPromptTokens) || "
                "self.minPromptTokens <= self.maxPromptTokens"
            ),
            message="minPromptTokens must not exceed maxPromptTokens",
            field_path=".minPromptTokens",
            holds=lambda s: (
                s.min_prompt_tokens is None
                or s.max_prompt_tokens is None
                or s.min_prompt_tokens <= s.max_prompt_tokens
            ),
        ),
    )


class RoutingRule(WireModel):
    """Send calls that match to a model, trying the fallbacks in order if it fails."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*)?$")] = (
        Field(description="Unique name of the rule; reported with every routed call.")
    )
    match: RuleMatch = Field(default_factory=RuleMatch, description="Traits the call must have.")
    model: ModelName = Field(description="The model that serves matching calls.")
    fallbacks: list[ModelName] = Field(
        default_factory=list,
        max_length=MAX_FALLBACKS,
        description="Models tried in order when the upstream fails (5xx, 429, unreachable).",
    )


class Downgrade(WireModel):
    """Past the soft limit, calls routed to one model go to a cheaper one instead."""

    from_model: ModelName = Field(alias="from", description="The model that is replaced.")
    to_model: ModelName = Field(alias="to", description="The cheaper model used instead.")


GRANT_ALL_NAMESPACES = "*"


class Grants(WireModel):
    """Which other namespaces' TeamBudgets may use this policy (a ReferenceGrant in the spec).

    A TeamBudget in the policy's own namespace may always reference it; one in another
    namespace only when that namespace is listed here. The policy's models and credentials
    are used for the granted teams' calls, so grant only the teams you mean to serve.
    """

    namespaces: list[
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=63,
                pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$",
            ),
        ]
    ] = Field(
        default_factory=list,
        max_length=256,
        description=(
            "Namespaces whose TeamBudgets may reference this policy in spec.routingPolicyRef; "
            '"*" grants every namespace. The policy\'s own namespace needs no grant.'
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    def grants(self, namespace: str) -> bool:
        return GRANT_ALL_NAMESPACES in self.namespaces or namespace in self.namespaces


class RoutingPolicySpec(WireModel):
    """Models, rules and downgrades of a routing policy."""

    models: list[ModelBackend] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description="The models this policy may route to.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    default_model: ModelName = Field(description="The model that serves calls no rule matches.")
    rules: list[RoutingRule] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="Ordered rules; the first that matches a call decides its model.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    soft_limit_downgrades: list[Downgrade] = Field(
        default_factory=list,
        max_length=MAX_MODELS,
        description="Applied to a team's calls once its budget passes the soft limit.",
    )
    prompt_cache_affinity: bool = Field(
        default=False,
        description=(
            "Keep the calls of one conversation (header X-Costwarden-Session) on the backend "
            "that served its first call, so provider prompt caches keep hitting."
        ),
    )

    default_max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description=(
            "The output-token ceiling of a call that sets none (OpenAI max_tokens / "
            "max_completion_tokens, Responses max_output_tokens). The gateway reserves the "
            "call's worst case (prompt estimate plus this many output tokens, at the model's "
            "prices) before forwarding it, and sends this ceiling upstream so the answer "
            "cannot outgrow the reservation. Unset: 8192."
        ),
    )

    grants: Grants | None = Field(
        default=None,
        description=(
            "Other namespaces whose TeamBudgets may use this policy. Without a grant only "
            "TeamBudgets in the policy's own namespace can reference it."
        ),
    )

    cel_rules = (
        CelRule(
            cel="self.models.exists(m, m.name == self.defaultModel)",
            message="defaultModel must name one of spec.models",
            field_path=".defaultModel",
            reason="FieldValueInvalid",
            holds=lambda s: s.default_model in s.model_names(),
        ),
        CelRule(
            cel=(
                "!has(self.rules) || self.rules.all(r, "
                "self.models.exists(m, m.name == r.model) && "
                "(!has(r.fallbacks) || r.fallbacks.all(f, self.models.exists(m, m.name == f))))"
            ),
            message="every rules[].model and rules[].fallbacks[] must name one of spec.models",
            field_path=".rules",
            reason="FieldValueInvalid",
            holds=lambda s: all({r.model, *r.fallbacks} <= s.model_names() for r in s.rules),
        ),
        CelRule(
            cel=(
                "!has(self.softLimitDowngrades) || self.softLimitDowngrades.all(d, "
                "self.models.exists(m, m.name == d.from) && "
                "self.models.exists(m, m.name == d.to))"
            ),
            message="softLimitDowngrades[].from and .to must name models in spec.models",
            field_path=".softLimitDowngrades",
            reason="FieldValueInvalid",
            holds=lambda s: all(
                {d.from_model, d.to_model} <= s.model_names() for d in s.soft_limit_downgrades
            ),
        ),
        CelRule(
            cel=(
                "!has(self.rules) || self.rules.all(r, !has(r.match) || "
                "!has(r.match.sensitivities) || !('Confidential' in r.match.sensitivities) || "
                "([r.model] + (has(r.fallbacks) ? r.fallbacks : [])).all(n, "
                "self.models.exists(m, m.name == n && m.locality == 'InCluster')))"
            ),
            message=(
                "a rule matching Confidential calls must route only to InCluster models "
                "(model and fallbacks): confidential work never leaves the cluster"
            ),
            field_path=".rules",
            reason="FieldValueForbidden",
            holds=lambda s: all(
                s.in_cluster_only([r.model, *r.fallbacks])
                for r in s.rules
                if Sensitivity.CONFIDENTIAL in r.match.sensitivities
            ),
        ),
    )

    def grants_namespace(self, namespace: str) -> bool:
        """Whether a TeamBudget in ``namespace`` may reference this policy (own namespace
        excluded: the caller decides that, as it knows the policy's namespace)."""
        return self.grants is not None and self.grants.grants(namespace)

    def model_names(self) -> set[str]:
        return {m.name for m in self.models}

    def in_cluster_only(self, names: list[str]) -> bool:
        return all(
            (m := self.model(n)) is not None and m.locality is Locality.IN_CLUSTER for n in names
        )

    def model(self, name: str) -> ModelBackend | None:
        return next((m for m in self.models if m.name == name), None)


class RoutingPolicyStatus(WireModel):
    """The observed state of a routing policy."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation last reconciled."
    )
    models: int | None = Field(default=None, ge=0, description="Number of models declared.")
    teams: int | None = Field(default=None, ge=0, description="Number of TeamBudgets using it.")
    last_rendered: datetime | None = Field(
        default=None, description="When the gateway configuration last included this policy."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, with the reason and the field at fault when it is not.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class RoutingPolicy(WireModel):
    """A RoutingPolicy object as stored by the API server."""

    api_version: str = Field(default="costwarden.io/v1alpha1", alias="apiVersion")
    kind: str = Field(default=KIND)
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus | None = None
