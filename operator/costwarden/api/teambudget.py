"""The TeamBudget kind: how much a team may spend on AI calls, and what happens when it has.

A TeamBudget selects the team's workloads (namespaces and/or a label selector), sets a
hard cap and a soft limit per period, optional token, per-model and per-job limits, and
says what enforcement does at the cap and when an agent job loops.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from costwarden.api.accounting import (
    MAX_HISTORY,
    MAX_MODELS,
    Changes,
    ClosedPeriod,
    ExactAmount,
    Ingestion,
    JobBreakdown,
    Leases,
    ModelSpend,
    Results,
    TokenUsage,
)
from costwarden.api.attribution import Attribution
from costwarden.api.base import WireModel
from costwarden.api.meta import (
    Condition,
    DnsLabel,
    LabelSelector,
    LocalObjectReference,
    ObjectName,
)
from costwarden.api.money import Money, StatusMoney
from costwarden.api.rules import CelRule

KIND = "TeamBudget"
PLURAL = "teambudgets"
SINGULAR = "teambudget"
SHORT_NAMES = ["tb", "budget"]

MAX_RECENT_ACTIONS = 20
MAX_PERCENT = 1_000_000_000
"""usedPercent is clamped here (an int64 cannot hold every ratio of spend to a micro-dollar cap)."""


def _quantity(path: str) -> str:
    """CEL: an amount field (int or string on the wire) as a comparable quantity."""
    return f"quantity(string({path}))"


class BudgetPeriod(StrEnum):
    """How often spend resets to zero."""

    DAILY = "Daily"
    WEEKLY = "Weekly"
    MONTHLY = "Monthly"


class RequestAction(StrEnum):
    """What the gateway does with new calls once the team is over its hard cap."""

    BLOCK = "Block"
    ALLOW = "Allow"


class JobAction(StrEnum):
    """What enforcement does to a running agent Job."""

    SUSPEND = "Suspend"
    DELETE = "Delete"
    NONE = "None"


class DeletePropagation(StrEnum):
    FOREGROUND = "Foreground"
    BACKGROUND = "Background"


class BudgetPhase(StrEnum):
    """Where the budget stands in its period. ``Invalid`` means the operator cannot apply it."""

    ACTIVE = "Active"
    SOFT_LIMITED = "SoftLimited"
    EXHAUSTED = "Exhausted"
    INVALID = "Invalid"


class WorkloadSelector(WireModel):
    """Which workloads belong to the team. Both parts must match when both are given."""

    namespaces: list[DnsLabel] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Namespaces whose workloads belong to the team. Empty means the TeamBudget's own "
            "namespace. Another namespace counts only when its Namespace object carries the "
            "annotation costwarden.io/budget: <this-namespace>/<this-name> (a cluster admin's "
            "consent); otherwise the budget is Ready=False (NamespaceNotGranted) and governs "
            "only its own namespace and the consenting ones."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    selector: LabelSelector | None = Field(
        default=None,
        description=(
            "Only pods and Jobs with these labels belong to the team. Empty selects all. It "
            "selects only inside the namespaces the budget governs."
        ),
    )


class Period(WireModel):
    """The accounting period: spend resets at its start, in the given time zone."""

    schedule: BudgetPeriod = Field(
        default=BudgetPeriod.MONTHLY,
        description="Daily, Weekly (from Monday 00:00) or Monthly (from the 1st, 00:00).",
    )
    time_zone: str = Field(
        default="UTC",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_+\-/]+$",
        description="IANA time zone in which periods start, e.g. Europe/Berlin.",
    )


class SoftLimit(WireModel):
    """Where the soft limit sits: a percentage of the hard cap, or an amount."""

    percent: int | None = Field(
        default=None,
        ge=1,
        le=99,
        description="Soft limit as a percentage of spec.hardCapUSD (1-99).",
    )
    amount_usd: Money | None = Field(
        default=None,
        alias="amountUSD",
        description="Soft limit as an amount in USD; must be lower than spec.hardCapUSD.",
    )

    cel_rules = (
        CelRule(
            cel="has(self.percent) != has(self.amountUSD)",
            message="set exactly one of percent or amountUSD",
            holds=lambda s: (s.percent is None) != (s.amount_usd is None),
        ),
    )

    def amount(self, hard_cap: Decimal) -> Decimal:
        """The soft limit in USD for a given hard cap."""
        if self.amount_usd is not None:
            return self.amount_usd
        return hard_cap * Decimal(self.percent or 0) / Decimal(100)


class TokenCaps(WireModel):
    """Token caps per period, on top of the USD cap. Any cap reached counts as the hard cap."""

    input: int | None = Field(default=None, ge=1, description="Maximum input tokens per period.")
    output: int | None = Field(default=None, ge=1, description="Maximum output tokens per period.")
    total: int | None = Field(
        default=None, ge=1, description="Maximum input plus output tokens per period."
    )


class ModelCap(WireModel):
    """A cap on one model's share of the budget, e.g. to ration a frontier model."""

    model: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="Model name as declared in the RoutingPolicy."
    )
    max_cost_usd: Money | None = Field(
        default=None, alias="maxCostUSD", description="Maximum spend on this model per period."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Maximum tokens (input plus output) on this model."
    )

    cel_rules = (
        CelRule(
            cel="has(self.maxCostUSD) || has(self.maxTokens)",
            message="set maxCostUSD, maxTokens or both",
            holds=lambda s: s.max_cost_usd is not None or s.max_tokens is not None,
        ),
    )


class PerJobLimits(WireModel):
    """Limits each agent Job (or pod outside a Job) must stay within, enforced by sidecars."""

    max_cost_usd: Money | None = Field(
        default=None, alias="maxCostUSD", description="Maximum spend of one job over its life."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Maximum tokens (input plus output) of one job."
    )
    max_requests_per_minute: int | None = Field(
        default=None, ge=1, le=100000, description="Maximum calls per minute from one job."
    )


class HardCapEnforcement(WireModel):
    """What happens once the team's hard cap is reached."""

    requests: RequestAction = Field(
        default=RequestAction.BLOCK,
        description="Block refuses new calls with HTTP 429; Allow only records and reports.",
    )
    jobs: JobAction = Field(
        default=JobAction.SUSPEND,
        description=(
            "Suspend sets spec.suspend on running agent Jobs (reversible, loses no work); "
            "Delete deletes them; None leaves them running."
        ),
    )
    delete_propagation: DeletePropagation = Field(
        default=DeletePropagation.BACKGROUND,
        description="Propagation policy used when jobs is Delete.",
    )


class LoopDetection(WireModel):
    """The retry-loop heuristic: a job repeating itself or failing over and over is stopped."""

    enabled: bool = Field(default=True, description="Whether loop detection runs at all.")
    identical_requests: int = Field(
        default=5,
        ge=2,
        le=10000,
        description="This many identical requests from one job within windowSeconds trip it.",
    )
    window_seconds: int = Field(
        default=300, ge=1, le=86400, description="The window for identicalRequests, in seconds."
    )
    consecutive_errors: int = Field(
        default=10,
        ge=1,
        le=10000,
        description="This many upstream errors in a row from one job trip it.",
    )
    action: JobAction = Field(
        default=JobAction.SUSPEND, description="What is done to the looping job."
    )


class Exemptions(WireModel):
    """Jobs that enforcement never stops. Only the budget can exempt; a job cannot opt out."""

    job_names: list[ObjectName] = Field(
        default_factory=list,
        max_length=128,
        description="Names of Jobs (in the team's namespaces) never suspended or deleted.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    job_selector: LabelSelector | None = Field(
        default=None, description="Jobs with these labels are never suspended or deleted."
    )


class TeamBudgetSpec(WireModel):
    """The desired budget of one team."""

    workloads: WorkloadSelector = Field(
        default_factory=WorkloadSelector,
        json_schema_extra={"default": {}},
        description="Which workloads belong to the team.",
    )
    period: Period = Field(
        default_factory=Period,
        json_schema_extra={"default": {}},
        description="The period at which spend resets.",
    )
    hard_cap_usd: Money = Field(
        alias="hardCapUSD",
        description="The most the team may spend per period, in USD.",
    )
    soft_limit: SoftLimit = Field(
        default_factory=lambda: SoftLimit(percent=80),
        json_schema_extra={"default": {"percent": 80}},
        description=(
            "Past the soft limit the budget turns SoftLimited: an Event is emitted and the "
            "RoutingPolicy's downgrades apply. Defaults to 80% of the hard cap."
        ),
    )
    token_caps: TokenCaps | None = Field(default=None, description="Optional token caps.")
    model_caps: list[ModelCap] = Field(
        default_factory=list,
        max_length=64,
        description="Optional caps per model.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["model"],
        },
    )
    per_job: PerJobLimits | None = Field(
        default=None, description="Optional limits for each agent job of the team."
    )
    on_hard_cap: HardCapEnforcement = Field(
        default_factory=HardCapEnforcement,
        json_schema_extra={"default": {}},
        description="What happens when the hard cap is reached.",
    )
    loop_detection: LoopDetection = Field(
        default_factory=LoopDetection,
        json_schema_extra={"default": {}},
        description="The retry-loop heuristic.",
    )
    exemptions: Exemptions | None = Field(
        default=None, description="Jobs that enforcement never stops."
    )
    routing_policy_ref: LocalObjectReference | None = Field(
        default=None,
        description=(
            "The RoutingPolicy that decides which model serves the team's calls. "
            "Without one, the team's calls are refused: there is no model to route to. A "
            "policy in another namespace must list this namespace in its "
            "spec.grants.namespaces, else the budget is Ready=False (ReferenceNotGranted) and "
            "its calls are refused."
        ),
    )

    attribution: Attribution = Field(
        default_factory=Attribution,
        json_schema_extra={"default": {}},
        description="The tags the team's usage records carry, read from the pods' "
        "costwarden.io/<key> labels and annotations (bounded), and who may report the "
        "outcomes of its changes (docs/attribution.md).",
    )

    cel_rules = (
        CelRule(
            cel=(
                "!has(self.softLimit) || !has(self.softLimit.amountUSD) || "
                f"{_quantity('self.softLimit.amountUSD')}.isLessThan({_quantity('self.hardCapUSD')})"
            ),
            message="softLimit.amountUSD must be lower than hardCapUSD",
            field_path=".softLimit.amountUSD",
            reason="FieldValueInvalid",
            holds=lambda s: (
                s.soft_limit.amount_usd is None or s.soft_limit.amount_usd < s.hard_cap_usd
            ),
        ),
        CelRule(
            cel=(
                "!has(self.modelCaps) || self.modelCaps.all(c, !has(c.maxCostUSD) || "
                f"!{_quantity('c.maxCostUSD')}.isGreaterThan({_quantity('self.hardCapUSD')}))"
            ),
            message="modelCaps[].maxCostUSD must not exceed hardCapUSD",
            field_path=".modelCaps",
            reason="FieldValueInvalid",
            holds=lambda s: all(
                c.max_cost_usd is None or c.max_cost_usd <= s.hard_cap_usd for c in s.model_caps
            ),
        ),
        CelRule(
            cel=(
                "!has(self.perJob) || !has(self.perJob.maxCostUSD) || "
                f"!{_quantity('self.perJob.maxCostUSD')}.isGreaterThan({_quantity('self.hardCapUSD')})"
            ),
            message="perJob.maxCostUSD must not exceed hardCapUSD",
            field_path=".perJob.maxCostUSD",
            reason="FieldValueInvalid",
            holds=lambda s: (
                s.per_job is None
                or s.per_job.max_cost_usd is None
                or s.per_job.max_cost_usd <= s.hard_cap_usd
            ),
        ),
    )

    def soft_limit_usd(self) -> Decimal:
        return self.soft_limit.amount(self.hard_cap_usd)


class PeriodWindow(WireModel):
    start: datetime = Field(description="When the current period started.")
    end: datetime = Field(description="When the current period ends and spend resets.")


class EnforcementRecord(WireModel):
    """One enforcement action, kept in status so `kubectl describe` tells the story."""

    time: datetime = Field(description="When the action was taken.")
    action: Annotated[str, Field(max_length=64)] = Field(
        description="What was done: Suspended, Deleted, Resumed, Blocked."
    )
    target: Annotated[str, Field(max_length=512)] = Field(
        description="The object acted on, as Kind/namespace/name."
    )
    reason: Annotated[str, Field(max_length=64)] = Field(
        description="Why, as a CamelCase reason, e.g. HardCapReached or RetryLoopDetected."
    )
    message: Annotated[str, Field(max_length=1024)] = Field(
        default="", description="Details in a sentence."
    )


class TeamBudgetStatus(WireModel):
    """The observed state of a budget: spend in the current period and what was done."""

    phase: BudgetPhase | None = Field(
        default=None, description="Active, SoftLimited, Exhausted or Invalid."
    )
    spent_usd: StatusMoney | None = Field(
        default=None, alias="spentUSD", description="Spend in the current period, in USD."
    )
    remaining_usd: Money | None = Field(
        default=None, alias="remainingUSD", description="Hard cap minus spend, never below 0."
    )
    used_percent: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PERCENT,
        description=f"Spend as a whole percentage of the hard cap (at most {MAX_PERCENT}).",
    )
    tokens: TokenUsage | None = Field(default=None, description="Tokens in the current period.")
    current_period: PeriodWindow | None = Field(default=None, description="The current period.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Ready, SoftLimitReached and HardCapReached, with reasons; UsageApplied once "
            "the team's usage was held (False while it is)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    recent_actions: list[EnforcementRecord] = Field(
        default_factory=list,
        max_length=MAX_RECENT_ACTIONS,
        description=f"The last {MAX_RECENT_ACTIONS} enforcement actions, newest last.",
    )
    spent_exact_usd: ExactAmount | None = Field(
        default=None,
        alias="spentExactUSD",
        description="Spend in the current period with every digit (spentUSD is rounded down).",
    )
    by_model: list[ModelSpend] = Field(
        default_factory=list,
        max_length=MAX_MODELS,
        description="Spend in the current period per served model.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["model"],
        },
    )
    by_job: JobBreakdown | None = Field(
        default=None, description="Spend in the current period per agent Job (bounded)."
    )
    results: Results | None = Field(
        default=None,
        description="Finished agent Jobs of the period by outcome: cost per result, waste.",
    )
    changes: Changes | None = Field(
        default=None,
        description="Spend tagged with a change (pull request, ticket) by repository and "
        "outcome: cost per merged change, spend on changes that never merged.",
    )
    history: list[ClosedPeriod] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description=f"The last {MAX_HISTORY} closed periods, newest last.",
    )
    ingestion: Ingestion | None = Field(
        default=None, description="Usage ingestion cursors (exactly-once de-duplication)."
    )
    leases: Leases | None = Field(
        default=None,
        description="Budget lent to gateway replicas (reserve-before-forward across replicas).",
    )


class TeamBudget(WireModel):
    """A TeamBudget object as stored by the API server."""

    api_version: str = Field(default="costwarden.io/v1alpha1", alias="apiVersion")
    kind: str = Field(default=KIND)
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: TeamBudgetSpec
    status: TeamBudgetStatus | None = None
