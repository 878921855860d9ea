"""TeamBudgets as accounting and enforcement see them: parsed spec, current standing.

Read from the reconciler's :class:`ObservedWorld` (kept current by Kopf's watch), parsed
once per observed version, so looking a team up on every usage batch or Job event costs
a dictionary access.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from costwarden.api.meta import LabelSelector
from costwarden.api.teambudget import BudgetPhase, TeamBudgetSpec
from costwarden.controllers.world import ObservedWorld
from costwarden.enforcement.decisions import belongs_to_team, labels_of
from costwarden.policy.caps import CapVerdict, evaluate_caps
from costwarden.policy.periods import is_valid_time_zone, period_bounds
from costwarden.policy.render import ObservedObject, observed_refused_need, observed_spend
from costwarden.policy.tenancy import Consents, attribute, governed_namespaces
from costwarden.policy.validation import parse_team_budget_spec


@dataclass(frozen=True)
class Budget:
    id: str
    namespace: str
    name: str
    uid: str
    spec: TeamBudgetSpec
    status: Mapping[str, Any]
    governed: tuple[str, ...] = ()
    """The namespaces it governs (policy.tenancy): its own and those consenting to it."""

    @property
    def namespaces(self) -> list[str]:
        return list(self.governed)

    @property
    def selector(self) -> LabelSelector | None:
        return self.spec.workloads.selector

    def period(self, now: datetime) -> tuple[datetime, datetime]:
        return period_bounds(self.spec.period.schedule, self.spec.period.time_zone, now)

    def standing(self, now: datetime, status: Mapping[str, Any] | None = None) -> CapVerdict:
        """The phase the status's spend puts the budget in: evaluate_caps, as everywhere."""
        start, _ = self.period(now)
        observed = self.status if status is None else status
        spent, tokens = observed_spend(observed, start)
        return verdict_for(self.spec, spent, tokens, observed_refused_need(observed, start))

    def selects(self, job: Mapping[str, Any]) -> bool:
        return belongs_to_team(job, self.spec, self.governed)


def verdict_for(
    spec: TeamBudgetSpec, spent: Any, tokens: Any, refused_need: Decimal | None = None
) -> CapVerdict:
    return evaluate_caps(
        spent_usd=spent,
        tokens=tokens,
        hard_cap_usd=spec.hard_cap_usd,
        soft_limit_usd=spec.soft_limit_usd(),
        token_caps=spec.token_caps,
        refused_need_usd=refused_need,
    )


def is_exhausted(verdict: CapVerdict) -> bool:
    return verdict.phase is BudgetPhase.EXHAUSTED


class BudgetIndex:
    """Valid TeamBudgets by id and by namespace, refreshed from the world lazily."""

    def __init__(self, world: ObservedWorld) -> None:
        self._world = world
        self._parsed: dict[str, tuple[ObservedObject, Budget | None]] = {}
        self._by_namespace: dict[str, list[Budget]] = {}
        self._snapshot: dict[str, ObservedObject] = {}
        self._consents: Consents = {}

    def _refresh(self) -> None:
        # A copy in one C call (atomic under the GIL): Kopf's thread updates the world.
        current = dict(self._world.budgets)
        consents = self._world.consents  # replaced, never mutated (world.apply_namespace)
        if (
            consents is self._consents
            and len(current) == len(self._snapshot)
            and all(self._snapshot.get(k) is v for k, v in current.items())
        ):
            return
        reparse = consents is not self._consents
        parsed: dict[str, tuple[ObservedObject, Budget | None]] = {}
        for budget_id, observed in current.items():
            cached = self._parsed.get(budget_id)
            if cached is not None and cached[0] is observed and not reparse:
                parsed[budget_id] = cached
            else:
                parsed[budget_id] = (observed, _parse(observed, consents))
        self._consents = consents
        self._parsed = parsed
        self._snapshot = dict(current)
        by_namespace: dict[str, list[Budget]] = {}
        for _, budget in sorted(parsed.items()):
            if budget[1] is not None:
                for namespace in budget[1].namespaces:
                    by_namespace.setdefault(namespace, []).append(budget[1])
        self._by_namespace = by_namespace

    def get(self, budget_id: str) -> Budget | None:
        self._refresh()
        entry = self._parsed.get(budget_id)
        return entry[1] if entry else None

    def all(self) -> list[Budget]:
        self._refresh()
        return [b for _, b in self._parsed.values() if b is not None]

    def for_job(self, job: Mapping[str, Any]) -> Budget | None:
        """The budget a Job belongs to (policy.tenancy.attribute, as the gateway)."""
        namespace = (job.get("metadata") or {}).get("namespace", "")
        return self.for_workload(namespace, labels_of(job))

    def for_workload(self, namespace: str, labels: Mapping[str, str]) -> Budget | None:
        """The budget a workload (a pod or Job: its namespace and labels) belongs to: one in
        its own namespace first, else the one its Namespace consents to; never another."""
        self._refresh()
        return attribute(self._by_namespace.get(namespace, []), namespace, labels, self._consents)

    def resource_version(self, budget_id: str) -> str:
        return self._world.version_of("budget", budget_id)

    def by_uid(self) -> dict[str, Budget]:
        return {b.uid: b for b in self.all()}


def _parse(observed: ObservedObject, consents: Consents) -> Budget | None:
    """A budget accounting can work with, or None. A spec the schema accepts may still name
    a time zone that does not exist (its Ready condition says so): without a period it can
    neither be charged nor enforced, and it must not break the checks of every other team."""
    spec = parse_team_budget_spec(observed.spec)
    if isinstance(spec, list) or not is_valid_time_zone(spec.period.time_zone):
        return None
    governed = governed_namespaces(spec, observed.namespace, observed.name, consents)
    return Budget(
        observed.id, observed.namespace, observed.name, observed.uid, spec, observed.status,
        tuple(governed),
    )  # fmt: skip
