"""The operator's Prometheus metrics. Labels are bounded: per team (one per TeamBudget),
per phase, per result; never per request or per Job."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from costwarden.api.teambudget import BudgetPhase
from costwarden.policy.render import Reconciliation

RECONCILE_SECONDS = Histogram(
    "costwarden_operator_reconcile_duration_seconds",
    "Time of one reconciliation pass over all budgets and policies.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "costwarden_operator_reconcile_errors_total", "Reconciliation passes that failed."
)
TASK_RESTARTS = Counter(
    "costwarden_operator_task_restarts_total",
    "Restarts of a supervised background task after it failed (docs/operations.md).",
    ["task"],
)
TASK_FAILING = Gauge(
    "costwarden_operator_task_failing",
    "1 while a supervised background task is failing (restarting with backoff), else 0.",
    ["task"],
)
CONFIG_PUBLISHES = Counter(
    "costwarden_operator_config_publishes_total",
    "Gateway configuration publications, by whether the ConfigMap had to be written.",
    ["result"],
)
CONFIG_INFO = Gauge(
    "costwarden_operator_config_teams",
    "Teams and policies in the published gateway configuration.",
    ["kind"],
)
BUDGETS_BY_PHASE = Gauge("costwarden_budgets", "TeamBudgets by phase.", ["phase"])
BUDGET_SPENT = Gauge(
    "costwarden_budget_spent_usd", "Spend in the current period, in USD.", ["team"]
)
BUDGET_LIMIT = Gauge("costwarden_budget_limit_usd", "Hard cap per period, in USD.", ["team"])
BUDGET_SOFT_LIMIT = Gauge("costwarden_budget_soft_limit_usd", "Soft limit, in USD.", ["team"])
BUDGET_USED_RATIO = Gauge(
    "costwarden_budget_used_ratio",
    "Spend divided by the hard cap (alert on > 0.8, page on >= 1).",
    ["team"],
)
BUDGET_PHASE = Gauge(
    "costwarden_budget_phase",
    "1 for the phase each team's budget is in, 0 for the others (alert on Exhausted).",
    ["team", "phase"],
)
POLICIES_READY = Gauge("costwarden_routing_policies", "RoutingPolicies by readiness.", ["ready"])

_known_teams: set[str] = set()


def observe_reconciliation(result: Reconciliation, seconds: float) -> None:
    RECONCILE_SECONDS.observe(seconds)
    CONFIG_INFO.labels(kind="teams").set(len(result.config.teams))
    CONFIG_INFO.labels(kind="policies").set(len(result.config.policies))
    phases = {phase.value: 0 for phase in BudgetPhase}
    for verdict in result.budgets.values():
        current = verdict.caps.phase if verdict.ready and verdict.caps else BudgetPhase.INVALID
        phases[current.value] += 1
    for name, count in phases.items():
        BUDGETS_BY_PHASE.labels(phase=name).set(count)
    ready = sum(1 for v in result.policies.values() if v.ready)
    POLICIES_READY.labels(ready="true").set(ready)
    POLICIES_READY.labels(ready="false").set(len(result.policies) - ready)
    _observe_teams(result)


def _observe_teams(result: Reconciliation) -> None:
    current = set()
    for team in result.config.teams:
        current.add(team.id)
        BUDGET_SPENT.labels(team=team.id).set(float(team.spend.spent_usd))
        BUDGET_LIMIT.labels(team=team.id).set(float(team.hard_cap_usd))
        BUDGET_SOFT_LIMIT.labels(team=team.id).set(float(team.soft_limit_usd))
        ratio = team.spend.spent_usd / team.hard_cap_usd if team.hard_cap_usd else 1
        BUDGET_USED_RATIO.labels(team=team.id).set(float(ratio))
        for phase in BudgetPhase:
            BUDGET_PHASE.labels(team=team.id, phase=phase.value).set(
                1 if team.spend.phase is phase else 0
            )
    # A deleted budget's series disappear instead of freezing at their last value.
    for gone in _known_teams - current:
        for gauge in (BUDGET_SPENT, BUDGET_LIMIT, BUDGET_SOFT_LIMIT, BUDGET_USED_RATIO):
            gauge.remove(gone)
        for phase in BudgetPhase:
            BUDGET_PHASE.remove(gone, phase.value)
    _known_teams.clear()
    _known_teams.update(current)
