"""From the TeamBudgets and RoutingPolicies in the cluster to the gateway configuration.

``reconcile`` is the operator's whole decision, pure: given every object it has observed,
it returns the GatewayConfig to publish and, for each object, the verdict to write into its
status (ready or not, why, which field). Invalid objects are left out of the configuration,
so a gateway never applies half of a budget; the team's calls are refused as unattributed
until the budget is fixed, which is the safe failure for a budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from costwarden.api.accounting import ModelSpend
from costwarden.api.attribution import Attribution
from costwarden.api.catalog import PriceCatalog
from costwarden.api.conditions import Reason
from costwarden.api.endpoints import ANY_HOST, ProviderHosts
from costwarden.api.gatewayconfig import (
    CredentialRef,
    GatewayConfig,
    ModelRoute,
    PolicyConfig,
    SpendState,
    TeamConfig,
)
from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.api.teambudget import BudgetPhase, TeamBudgetSpec, TeamBudgetStatus, TokenUsage
from costwarden.policy.caps import CapVerdict, evaluate_caps
from costwarden.policy.periods import period_bounds
from costwarden.policy.pricing import resolve_pricing
from costwarden.policy.tenancy import (
    Consents,
    governed_namespaces,
    tenancy_problems,
)
from costwarden.policy.validation import (
    Problem,
    parse_routing_policy_spec,
    parse_team_budget_spec,
    policy_id_of,
    routing_policy_problems,
    schema_problems,
    team_budget_problems,
)


@dataclass(frozen=True)
class ObservedObject:
    """What the operator saw of one object: identity, generation, spec and status as JSON."""

    namespace: str
    name: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any] = field(default_factory=dict)
    uid: str = ""

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Verdict:
    """Whether an object is applied, and if not the problems, worst first."""

    ready: bool
    reason: Reason
    message: str
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class BudgetVerdict(Verdict):
    caps: CapVerdict | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None


@dataclass(frozen=True)
class PolicyVerdict(Verdict):
    models: int = 0
    teams: int = 0


@dataclass
class Reconciliation:
    config: GatewayConfig
    budgets: dict[str, BudgetVerdict]
    policies: dict[str, PolicyVerdict]


def reconcile(
    budgets: Sequence[ObservedObject],
    policies: Sequence[ObservedObject],
    catalog: PriceCatalog,
    now: datetime,
    provider_hosts: ProviderHosts = ANY_HOST,
    consents: Consents | None = None,
) -> Reconciliation:
    """``provider_hosts``: the admin's allow-list of External hosts (empty: any).
    ``consents``: namespace -> its ``costwarden.io/budget`` annotation (policy.tenancy);
    None or empty, every budget governs only its own namespace."""
    policy_specs, policy_verdicts, policy_configs = _reconcile_policies(
        policies, catalog, provider_hosts
    )
    budget_verdicts: dict[str, BudgetVerdict] = {}
    teams: list[TeamConfig] = []
    for budget in sorted(budgets, key=lambda o: o.id):
        verdict, team = _reconcile_budget(budget, policy_specs, now, consents or {})
        budget_verdicts[budget.id] = verdict
        if team is not None:
            teams.append(team)
    used = [t.routing_policy for t in teams]
    policy_verdicts = {pid: _with_teams(v, used.count(pid)) for pid, v in policy_verdicts.items()}
    config = GatewayConfig(
        teams=teams,
        policies=policy_configs,
        allowed_provider_hosts=list(provider_hosts.allowed) or None,
    )
    return Reconciliation(with_revision(config), budget_verdicts, policy_verdicts)


def _with_teams(verdict: PolicyVerdict, teams: int) -> PolicyVerdict:
    return PolicyVerdict(
        verdict.ready, verdict.reason, verdict.message, verdict.problems, verdict.models, teams
    )


def _reconcile_policies(
    policies: Sequence[ObservedObject], catalog: PriceCatalog, provider_hosts: ProviderHosts
) -> tuple[dict[str, RoutingPolicySpec | None], dict[str, PolicyVerdict], list[PolicyConfig]]:
    specs: dict[str, RoutingPolicySpec | None] = {}
    verdicts: dict[str, PolicyVerdict] = {}
    configs: list[PolicyConfig] = []
    for policy in sorted(policies, key=lambda o: o.id):
        parsed = parse_routing_policy_spec(policy.spec)
        problems = (
            parsed
            if isinstance(parsed, list)
            else routing_policy_problems(parsed, catalog, provider_hosts)
        )
        if problems or isinstance(parsed, list):
            specs[policy.id] = None
            verdicts[policy.id] = PolicyVerdict(
                False, problems[0].reason, _summary(problems), tuple(problems)
            )
            continue
        specs[policy.id] = parsed
        configs.append(_policy_config(policy, parsed, catalog))
        verdicts[policy.id] = PolicyVerdict(
            True,
            Reason.RECONCILED,
            "included in the gateway configuration",
            models=len(parsed.models),
        )
    return specs, verdicts, configs


def _policy_config(
    policy: ObservedObject, spec: RoutingPolicySpec, catalog: PriceCatalog
) -> PolicyConfig:
    models = []
    for model in spec.models:
        pricing = resolve_pricing(model, catalog)
        assert pricing is not None  # routing_policy_problems refused the policy otherwise
        credentials = (
            CredentialRef(
                namespace=policy.namespace, name=model.credentials.name, key=model.credentials.key
            )
            if model.credentials
            else None
        )
        models.append(
            ModelRoute(
                name=model.name,
                provider=model.provider,
                endpoint=model.endpoint,
                upstream_model=model.upstream_id,
                locality=model.locality,
                credentials=credentials,
                pricing=pricing,
            )
        )
    return PolicyConfig(
        id=policy.id,
        generation=policy.generation,
        models=models,
        default_model=spec.default_model,
        rules=spec.rules,
        soft_limit_downgrades=spec.soft_limit_downgrades,
        prompt_cache_affinity=spec.prompt_cache_affinity,
        default_max_output_tokens=spec.default_max_output_tokens,
    )


def _reconcile_budget(
    budget: ObservedObject,
    policies: Mapping[str, RoutingPolicySpec | None],
    now: datetime,
    consents: Consents,
) -> tuple[BudgetVerdict, TeamConfig | None]:
    parsed = parse_team_budget_spec(budget.spec)
    if isinstance(parsed, list):
        return _invalid(parsed), None
    restrictions = tenancy_problems(
        parsed, budget.namespace, budget.name, consents=consents, policies=policies
    )
    problems = team_budget_problems(parsed, namespace=budget.namespace, policies=policies)
    if problems:
        return _invalid([*problems, *restrictions]), None
    start, end = period_bounds(parsed.period.schedule, parsed.period.time_zone, now)
    spent, tokens = observed_spend(budget.status, start)
    caps = evaluate_caps(
        spent_usd=spent,
        tokens=tokens,
        hard_cap_usd=parsed.hard_cap_usd,
        soft_limit_usd=parsed.soft_limit_usd(),
        token_caps=parsed.token_caps,
        refused_need_usd=observed_refused_need(budget.status, start),
    )
    # A restricted budget (T1/T2) still caps what it governs: dropping it would lift its cap.
    granted = not any(p.reason is Reason.REFERENCE_NOT_GRANTED for p in restrictions)
    policy_id = policy_id_of(parsed, budget.namespace) if granted else None
    governed = governed_namespaces(parsed, budget.namespace, budget.name, consents)
    team = _team_config(budget, parsed, governed, policy_id, caps, spent, tokens, start, end)
    if parsed.model_caps:
        capped = {c.model for c in parsed.model_caps}
        models = [m for m in observed_model_spend(budget.status, start) if m.model in capped]
        team.spend.models = models
    if restrictions:
        verdict = BudgetVerdict(
            False,
            restrictions[0].reason,
            _summary(restrictions),
            tuple(restrictions),
            caps=caps,
            period_start=start,
            period_end=end,
        )
    elif policy_id is None:
        verdict = BudgetVerdict(
            True,
            Reason.NO_ROUTING_POLICY,
            "no spec.routingPolicyRef: the team's calls are refused until one is set",
            caps=caps,
            period_start=start,
            period_end=end,
        )
    else:
        verdict = BudgetVerdict(
            True,
            Reason.RECONCILED,
            f"included in the gateway configuration, routed by {policy_id}",
            caps=caps,
            period_start=start,
            period_end=end,
        )
    return verdict, team


def _team_config(
    budget: ObservedObject,
    spec: TeamBudgetSpec,
    governed: list[str],
    policy_id: str | None,
    caps: CapVerdict,
    spent: Decimal,
    tokens: TokenUsage,
    start: datetime,
    end: datetime,
) -> TeamConfig:
    return TeamConfig(
        id=budget.id,
        generation=budget.generation,
        namespaces=governed,
        selector=spec.workloads.selector,
        period=spec.period,
        hard_cap_usd=spec.hard_cap_usd,
        soft_limit_usd=spec.soft_limit_usd(),
        token_caps=spec.token_caps,
        model_caps=spec.model_caps,
        per_job=spec.per_job,
        on_hard_cap=spec.on_hard_cap,
        loop_detection=spec.loop_detection,
        exemptions=spec.exemptions,
        routing_policy=policy_id,
        attribution=spec.attribution if spec.attribution != Attribution() else None,
        spend=SpendState(
            phase=caps.phase, spent_usd=spent, tokens=tokens, period_start=start, period_end=end
        ),
    )


def observed_spend(status: Mapping[str, Any], period_start: datetime) -> tuple[Decimal, TokenUsage]:
    """Spend recorded in status for the period starting at ``period_start``; zero otherwise.

    Spend recorded for an earlier period does not count against the new one: the period
    rolled over and the accounting has not yet written the new period's totals.
    """
    try:
        recorded = TeamBudgetStatus.model_validate(status)
    except ValidationError:
        return Decimal(0), TokenUsage()
    window = recorded.current_period
    if window is None or window.start != period_start or recorded.spent_usd is None:
        return Decimal(0), TokenUsage()
    return recorded.spent_usd, recorded.tokens or TokenUsage()


def observed_refused_need(status: Mapping[str, Any], period_start: datetime) -> Decimal | None:
    """The smallest call refused at the cap this period (status.leases.refusedNeedUSD), if
    the status is of the period starting at ``period_start`` (policy/leases.py)."""
    try:
        recorded = TeamBudgetStatus.model_validate(status)
    except ValidationError:
        return None
    window = recorded.current_period
    if window is None or window.start != period_start or recorded.leases is None:
        return None
    return recorded.leases.refused_need_usd


def observed_model_spend(status: Mapping[str, Any], period_start: datetime) -> list[ModelSpend]:
    """Per-model spend recorded in status for the period starting at ``period_start``
    (sorted by model, so renders stay byte-identical); empty otherwise. The gateway
    reserves ``modelCaps`` against it."""
    try:
        recorded = TeamBudgetStatus.model_validate(status)
    except ValidationError:
        return []
    window = recorded.current_period
    if window is None or window.start != period_start:
        return []
    return sorted(recorded.by_model, key=lambda m: m.model)


def _invalid(problems: list[Problem]) -> BudgetVerdict:
    reason = problems[0].reason if problems else Reason.INVALID_SPEC
    return BudgetVerdict(False, reason, _summary(problems), tuple(problems))


def _summary(problems: Sequence[Problem]) -> str:
    return "; ".join(str(p) for p in problems)


def serialize(config: GatewayConfig) -> str:
    """Stable JSON: sorted keys, no whitespace noise, so equal configs are equal bytes."""
    return json.dumps(config.to_wire(), sort_keys=True, separators=(",", ":"))


def with_revision(config: GatewayConfig) -> GatewayConfig:
    """The config with ``revision`` set to the sha256 of its content (revision excluded)."""
    body = serialize(config.model_copy(update={"revision": ""}))
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return config.model_copy(update={"revision": digest})


__all__ = [
    "BudgetPhase",
    "BudgetVerdict",
    "ObservedObject",
    "PolicyVerdict",
    "Reconciliation",
    "reconcile",
    "schema_problems",
    "serialize",
    "with_revision",
]
