"""Who governs what: the tenancy rules every part of costwarden applies the same way.

A TeamBudget is written by a namespace admin, who must not be able to reach into other
tenants' namespaces. Two rules decide (docs/security.md, DESIGN T1/T2):

- **Governed namespaces** (Kueue's ClusterQueue/LocalQueue split). A budget governs its
  own namespace. It governs another namespace N only when the Namespace object N -
  cluster-scoped, so only a cluster admin can edit it - carries the annotation
  ``costwarden.io/budget: <budget-namespace>/<budget-name>``. A claim in
  ``spec.workloads.namespaces`` without that consent is a problem (``NamespaceNotGranted``)
  and is ignored: the budget then governs its own namespace plus the consenting ones, so
  a typo never lifts a cap and a hostile claim never reaches a victim.
- **Cross-namespace references** (Gateway API's ReferenceGrant). A ``routingPolicyRef`` to
  a RoutingPolicy in another namespace is granted only when that policy lists the
  budget's namespace (or ``"*"``) in ``spec.grants.namespaces``; otherwise
  ``ReferenceNotGranted``, and the team is treated as one without a policy (calls refused).

And one attribution rule, used by render, the gateway, ingestion and enforcement: a
workload (namespace + labels) belongs to the first budget (by id) *in its own namespace*
that selects it; else to the budget its namespace's annotation names, if that budget
governs the namespace and selects it; never to a budget the namespace did not consent to.

Everything here is pure (no I/O): callers pass the consents they observed, as a mapping
``namespace -> annotation value`` (only namespaces that carry the annotation).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from costwarden.api.conditions import Reason
from costwarden.api.meta import LabelSelector
from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.policy.validation import Problem

BUDGET_ANNOTATION = "costwarden.io/budget"
"""The Namespace annotation by which a cluster admin lets a budget elsewhere govern it."""

ROUTING_POLICY_REF_FIELD = "spec.routingPolicyRef"

Consents = Mapping[str, str]
"""namespace -> the value of its ``costwarden.io/budget`` annotation (``ns/name``)."""


def consent_of(annotations: Mapping[str, str] | None) -> str | None:
    """The budget id (``namespace/name``) a Namespace's annotations consent to, or None."""
    value = (annotations or {}).get(BUDGET_ANNOTATION)
    if not isinstance(value, str):
        return None
    value = value.strip()
    namespace, sep, name = value.partition("/")
    return value if sep and namespace and name and "/" not in name else None


def consents_from_namespaces(namespaces: Iterable[Mapping[str, object]]) -> dict[str, str]:
    """The consents carried by Namespace objects (API bodies or manifests)."""
    consents: dict[str, str] = {}
    for body in namespaces:
        meta = body.get("metadata")
        if not isinstance(meta, Mapping):
            continue
        name, annotations = meta.get("name"), meta.get("annotations")
        budget = consent_of(annotations if isinstance(annotations, Mapping) else None)
        if isinstance(name, str) and budget is not None:
            consents[name] = budget
    return consents


def claimed_namespaces(spec: TeamBudgetSpec, budget_namespace: str) -> list[str]:
    """What the budget asks for: ``spec.workloads.namespaces``, or its own namespace."""
    return list(spec.workloads.namespaces) or [budget_namespace]


def may_govern(namespace: str, budget_namespace: str, budget_name: str, consents: Consents) -> bool:
    """Whether a budget may govern ``namespace``: its own, or one that names it."""
    return namespace == budget_namespace or consents.get(namespace) == (
        f"{budget_namespace}/{budget_name}"
    )


def governed_namespaces(
    spec: TeamBudgetSpec, budget_namespace: str, budget_name: str, consents: Consents
) -> list[str]:
    """The namespaces a budget governs, sorted: the claims that may be governed; when a
    claim is refused, the budget's own namespace as well (a typo never lifts its cap)."""
    claimed = claimed_namespaces(spec, budget_namespace)
    allowed = {ns for ns in claimed if may_govern(ns, budget_namespace, budget_name, consents)}
    if len(allowed) < len(set(claimed)):
        allowed.add(budget_namespace)
    return sorted(allowed)


def namespace_problems(
    spec: TeamBudgetSpec,
    budget_namespace: str,
    budget_name: str,
    consents: Consents,
    *,
    known_namespaces: Collection[str] | None = None,
) -> list[Problem]:
    """A ``NamespaceNotGranted`` problem for each claimed namespace without consent.

    ``known_namespaces``: offline (``costwarden validate``), the namespaces whose
    Namespace manifest is in the set; a claim on any other cannot be verified and is
    reported as such. None (the operator): every namespace's annotations are known.
    """
    budget_id = f"{budget_namespace}/{budget_name}"
    problems = []
    for index, namespace in enumerate(spec.workloads.namespaces):
        if may_govern(namespace, budget_namespace, budget_name, consents):
            continue
        field = f"spec.workloads.namespaces[{index}]"
        if known_namespaces is not None and namespace not in known_namespaces:
            message = (
                f"namespace {namespace!r} is not the budget's own and its Namespace manifest is "
                f"not in the set, so its consent (annotation {BUDGET_ANNOTATION}: {budget_id}) "
                "cannot be verified"
            )
        else:
            holder = consents.get(namespace)
            message = (
                f"namespace {namespace!r} does not consent: its Namespace needs the annotation "
                f"{BUDGET_ANNOTATION}: {budget_id} (set by a cluster admin)"
                + (f"; it names {holder}" if holder else "")
                + "; the budget governs only its own namespace and consenting ones"
            )
        problems.append(Problem(field, message, Reason.NAMESPACE_NOT_GRANTED))
    return problems


def is_reference_granted(
    budget_namespace: str, policy_namespace: str, policy: RoutingPolicySpec
) -> bool:
    """Whether a budget in ``budget_namespace`` may use the policy in ``policy_namespace``."""
    return budget_namespace == policy_namespace or policy.grants_namespace(budget_namespace)


def reference_problem(
    spec: TeamBudgetSpec, budget_namespace: str, policies: Mapping[str, RoutingPolicySpec | None]
) -> Problem | None:
    """``ReferenceNotGranted`` when the budget's routingPolicyRef points at a (valid)
    policy in another namespace that does not grant the budget's namespace."""
    ref = spec.routing_policy_ref
    if ref is None or ref.namespace in (None, budget_namespace):
        return None
    policy_namespace = ref.namespace
    policy = policies.get(f"{policy_namespace}/{ref.name}")
    if policy is None or is_reference_granted(budget_namespace, policy_namespace, policy):
        return None
    return Problem(
        ROUTING_POLICY_REF_FIELD,
        f"RoutingPolicy {policy_namespace}/{ref.name} does not grant namespace "
        f'{budget_namespace!r} (its spec.grants.namespaces must list it or "*"); the '
        "team's calls are refused until it does",
        Reason.REFERENCE_NOT_GRANTED,
    )


def tenancy_problems(
    spec: TeamBudgetSpec,
    budget_namespace: str,
    budget_name: str,
    *,
    consents: Consents,
    policies: Mapping[str, RoutingPolicySpec | None],
    known_namespaces: Collection[str] | None = None,
) -> list[Problem]:
    """Every T1/T2 problem of a budget: unconsented namespaces, then an ungranted ref.

    These problems make the budget Ready=False without dropping it: it keeps governing
    (and capping) what it may govern; with an ungranted ref its calls are refused.
    """
    problems = namespace_problems(
        spec, budget_namespace, budget_name, consents, known_namespaces=known_namespaces
    )
    ref = reference_problem(spec, budget_namespace, policies)
    return [*problems, ref] if ref is not None else problems


TENANCY_REASONS = frozenset({Reason.NAMESPACE_NOT_GRANTED, Reason.REFERENCE_NOT_GRANTED})
"""Reasons of problems that restrict a budget rather than invalidate it."""


class Scope(Protocol):
    """What attribution needs of a budget: its id, governed namespaces and selector."""

    @property
    def id(self) -> str: ...

    @property
    def namespaces(self) -> Sequence[str]: ...

    @property
    def selector(self) -> LabelSelector | None: ...


S = TypeVar("S", bound=Scope)


def _selects(scope: Scope, namespace: str, labels: Mapping[str, str]) -> bool:
    if namespace not in scope.namespaces:
        return False
    return scope.selector is None or scope.selector.matches(dict(labels))


def attribute(
    scopes: Iterable[S],
    namespace: str,
    labels: Mapping[str, str],
    consents: Consents | None = None,
) -> S | None:
    """The budget a workload (its namespace and labels) belongs to, or None.

    ``scopes`` carry *governed* namespaces (already filtered by consent). A budget in the
    workload's own namespace that selects it wins (the first by id); else the budget the
    namespace's annotation names, if it selects it. ``consents``, when the caller has
    them, is checked again so a scope with an unconsented namespace can never win.
    Without them (the gateway, which sees only the rendered configuration) the namespace
    can have been governed by a foreign budget only through consent, which names one.
    """
    local: list[S] = []
    foreign: list[S] = []
    for scope in scopes:
        if not _selects(scope, namespace, labels):
            continue
        owner_namespace = scope.id.partition("/")[0]
        if owner_namespace == namespace:
            local.append(scope)
        elif consents is None or consents.get(namespace) == scope.id:
            foreign.append(scope)
    if local:
        return min(local, key=lambda s: s.id)
    return min(foreign, key=lambda s: s.id) if foreign else None


__all__ = [
    "BUDGET_ANNOTATION",
    "TENANCY_REASONS",
    "Consents",
    "Scope",
    "attribute",
    "claimed_namespaces",
    "consent_of",
    "consents_from_namespaces",
    "governed_namespaces",
    "is_reference_granted",
    "may_govern",
    "namespace_problems",
    "reference_problem",
    "tenancy_problems",
]
