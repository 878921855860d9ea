"""What a routing change would have cost: last period's calls replayed through both policies.

Each metered call is routed by ``policy.routing.decide`` under the old and the new gateway
configuration, and its tokens are priced (``policy.pricing.call_cost``) at the prices of
the model each side chooses. The difference, scaled from the export's span to a month, is
the estimate. Its assumptions are stated with it (:data:`ASSUMPTIONS`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

from costwarden.api.gatewayconfig import GatewayConfig, PolicyConfig
from costwarden.api.routingpolicy import RoutingRule, Sensitivity
from costwarden.gitops.classes import route
from costwarden.gitops.usage import UsageExport, UsedCall
from costwarden.policy.pricing import call_cost
from costwarden.policy.routing import RequestTraits

DAYS_PER_MONTH = Decimal(30)
ASSUMPTIONS = (
    "a month is 30 days; the export's span (or --usage-days) is scaled to it linearly",
    "every call uses as many tokens on the newly chosen model as it did on the old one",
    "calls are priced at list prices of the configuration, not at the recorded cost",
    "a call the new rules refuse costs nothing (its work may move elsewhere)",
    "soft-limit downgrades are not applied (budgets are taken to be under their soft limit)",
    "routing hints the ledger does not record (task, sensitivity, tools) are inferred from "
    "the old rule that matched: its first task and sensitivity, its tools setting; a call of "
    "the default rule is taken to have no task, Internal sensitivity and no tools",
)


@dataclass
class ReplayEstimate:
    calls: int = 0
    moved: int = 0
    """Calls whose model (or refusal) differs under the new rules."""
    refused: int = 0
    """Calls the new rules refuse."""
    inferred: int = 0
    """Calls whose task/sensitivity/tools were inferred, not recorded."""
    days: Decimal = Decimal(1)
    old_cost: Decimal = Decimal(0)
    new_cost: Decimal = Decimal(0)
    recorded_cost: Decimal = Decimal(0)
    skipped: Counter[str] = field(default_factory=Counter)
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def scale(self) -> Decimal:
        return DAYS_PER_MONTH / self.days

    @property
    def old_monthly(self) -> Decimal:
        return self.old_cost * self.scale

    @property
    def new_monthly(self) -> Decimal:
        return self.new_cost * self.scale

    @property
    def monthly_change(self) -> Decimal:
        return self.new_monthly - self.old_monthly


def replay(
    export: UsageExport,
    old: GatewayConfig,
    new: GatewayConfig,
    *,
    days: int | None = None,
) -> ReplayEstimate:
    estimate = ReplayEstimate(skipped=Counter(export.skipped))
    for call in export.calls:
        old_policy = _policy_for(call, old)
        if old_policy is None:
            estimate.skipped["its policy is not in the old manifests"] += 1
            continue
        new_policy = _policy_for(call, new, fallback_id=old_policy.id)
        traits, inferred = traits_of(call, old_policy)
        before, after = route(old_policy, traits), route(new_policy, traits)
        estimate.calls += 1
        estimate.inferred += inferred
        estimate.recorded_cost += call.recorded_cost or Decimal(0)
        estimate.old_cost += _cost(call, old_policy, before.model)
        estimate.new_cost += _cost(call, new_policy, after.model)
        if (before.refusal or before.model) != (after.refusal or after.model):
            estimate.moved += 1
            estimate.moves[(str(before), str(after))] += 1
        estimate.refused += bool(after.refusal)
    estimate.days = Decimal(days) if days else Decimal(_span_days(export.calls))
    return estimate


def _policy_for(
    call: UsedCall, config: GatewayConfig, fallback_id: str = ""
) -> PolicyConfig | None:
    """The policy routing the call's team in this configuration, else the recorded one."""
    team = config.team(call.team) if call.team else None
    if team is not None and team.routing_policy:
        return config.policy(team.routing_policy)
    return config.policy(call.policy or fallback_id)


def traits_of(call: UsedCall, old_policy: PolicyConfig) -> tuple[RequestTraits, bool]:
    """The call's routing traits, and whether some had to be inferred from the old rule."""
    rule = next((r for r in old_policy.rules if r.name == call.rule), None)
    inferred = None in (call.task, call.sensitivity, call.has_tools)
    task, sensitivity, tools = _inferred_hints(rule)
    traits = RequestTraits(
        provider=call.provider,
        requested_model=call.requested_model,
        task=call.task if call.task is not None else task,
        prompt_tokens=call.prompt_tokens,
        has_tools=call.has_tools if call.has_tools is not None else tools,
        sensitivity=call.sensitivity if call.sensitivity is not None else sensitivity,
    )
    return traits, inferred


def _inferred_hints(rule: RoutingRule | None) -> tuple[str, Sensitivity, bool]:
    if rule is None:
        return "", Sensitivity.INTERNAL, False
    match = rule.match
    return (
        match.tasks[0] if match.tasks else "",
        match.sensitivities[0] if match.sensitivities else Sensitivity.INTERNAL,
        bool(match.has_tools),
    )


def _cost(call: UsedCall, policy: PolicyConfig | None, model: str) -> Decimal:
    route = policy.model(model) if policy is not None and model else None
    return (
        call_cost(call.tokens, route.pricing, call.tool_calls) if route is not None else Decimal(0)
    )


def _span_days(calls: list[UsedCall]) -> int:
    """Whole days from the first to the last call, at least one."""
    if not calls:
        return 1
    times = [c.time for c in calls]
    seconds = (max(times) - min(times)).total_seconds()
    return max(1, math.ceil(seconds / 86400))
