"""Whether two TeamBudgets can select the same workload.

The gateway charges a workload to the first team (by id) that selects it, so two budgets
that can both select one pod are a silent mistake: one team's spend lands on the other's
budget. Two budgets overlap when their namespaces intersect and some label set satisfies
both selectors; the check is exact for ``metav1.LabelSelector`` semantics.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from costwarden.api.meta import LabelSelector, LabelSelectorOperator
from costwarden.api.teambudget import TeamBudgetSpec


@dataclass
class _KeyConstraint:
    """What all requirements on one label key demand together."""

    allowed: set[str] | None = None
    """Values the key may take (None: any value)."""
    forbidden: set[str] | None = None
    must_exist: bool = False
    must_be_absent: bool = False

    def allow(self, values: set[str]) -> None:
        self.allowed = values if self.allowed is None else self.allowed & values
        self.must_exist = True

    def satisfiable(self) -> bool:
        if self.must_be_absent:
            return not self.must_exist
        if self.allowed is None:
            return True  # Exists/NotIn only: some other value always satisfies them
        return bool(self.allowed - (self.forbidden or set()))


def selectors_can_both_match(a: LabelSelector | None, b: LabelSelector | None) -> bool:
    """Whether one label set can satisfy both selectors (None selects everything)."""
    constraints: dict[str, _KeyConstraint] = defaultdict(_KeyConstraint)
    for selector in (a, b):
        if selector is None:
            continue
        for key, value in selector.match_labels.items():
            constraints[key].allow({value})
        for req in selector.match_expressions:
            constraint = constraints[req.key]
            if req.operator is LabelSelectorOperator.IN:
                constraint.allow(set(req.values))
            elif req.operator is LabelSelectorOperator.NOT_IN:
                constraint.forbidden = (constraint.forbidden or set()) | set(req.values)
            elif req.operator is LabelSelectorOperator.EXISTS:
                constraint.must_exist = True
            else:
                constraint.must_be_absent = True
    return all(c.satisfiable() for c in constraints.values())


def effective_namespaces(spec: TeamBudgetSpec, own_namespace: str) -> set[str]:
    """The namespaces a budget covers: its list, or its own namespace when the list is empty."""
    return set(spec.workloads.namespaces) or {own_namespace}


def shared_namespaces(
    a: TeamBudgetSpec, a_namespace: str, b: TeamBudgetSpec, b_namespace: str
) -> set[str]:
    """Namespaces where both budgets can select one workload (empty: no overlap)."""
    common = effective_namespaces(a, a_namespace) & effective_namespaces(b, b_namespace)
    if not common:
        return set()
    if not selectors_can_both_match(a.workloads.selector, b.workloads.selector):
        return set()
    return common
