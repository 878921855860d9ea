"""Offline validation: the verdict the API server and the operator would reach, before apply.

One rule set: each object goes through the same pydantic models (schema plus the Python
twins of the CRD's CEL rules) and the same ``policy.validation`` checks the operator runs
for its Ready condition. On top come the checks only a whole set of manifests allows:
references to objects that are not in the set, duplicated objects, and budgets that
select the same workloads, and tenancy (policy.tenancy): a budget's claim on another
namespace is checked against the ``costwarden.io/budget`` annotation of that Namespace's
manifest in the set (absent manifest: consent cannot be verified, an error), and a
cross-namespace routingPolicyRef against the policy's ``spec.grants``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from costwarden.api import routingpolicy, teambudget
from costwarden.api.catalog import PriceCatalog
from costwarden.api.conditions import Reason
from costwarden.api.endpoints import ANY_HOST, ProviderHosts
from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.gitops.loader import Document
from costwarden.gitops.objects import (
    DEFAULT_NAMESPACE,
    ManifestObject,
    envelope_problems,
    namespace_manifests,
    read_objects,
)
from costwarden.gitops.overlap import shared_namespaces
from costwarden.policy.tenancy import consents_from_namespaces, tenancy_problems
from costwarden.policy.validation import (
    Problem,
    parse_routing_policy_spec,
    parse_team_budget_spec,
    policy_id_of,
    routing_policy_problems,
    team_budget_problems,
)

OVERLAP_FIELD = "spec.workloads"


@dataclass(frozen=True)
class Finding:
    """A problem located: file, document, object, field and line."""

    object: ManifestObject
    problem: Problem

    @property
    def source(self) -> str:
        return self.object.document.source

    @property
    def line(self) -> int:
        return self.object.document.line_of(self.problem.field)


@dataclass(frozen=True)
class RefPolicy:
    """How to treat a TeamBudget's reference to a RoutingPolicy that is not in the set."""

    assume_exists: frozenset[str] = frozenset()
    """``namespace/name`` of RoutingPolicies that exist outside the manifests checked."""
    allow_all_external: bool = False
    """Trust every reference to a policy outside the set (other repositories own them)."""

    def trusts(self, policy_id: str) -> bool:
        return self.allow_all_external or policy_id in self.assume_exists


@dataclass
class Report:
    objects: list[ManifestObject] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.findings


def validate(
    documents: Sequence[Document],
    *,
    catalog: PriceCatalog,
    default_namespace: str = DEFAULT_NAMESPACE,
    refs: RefPolicy | None = None,
    provider_hosts: ProviderHosts = ANY_HOST,
) -> Report:
    refs = refs or RefPolicy()
    objects = read_objects(documents, default_namespace)
    report = Report(objects=objects)
    duplicates = _duplicates(objects)
    report.findings.extend(duplicates)
    replaced = {id(f.object) for f in duplicates}
    policies: dict[str, RoutingPolicySpec | None] = {}
    budgets: list[tuple[ManifestObject, TeamBudgetSpec]] = []
    for obj in objects:
        if id(obj) in replaced:
            continue  # reported as a duplicate; its twin is checked
        problems = envelope_problems(obj)
        if problems:
            report.findings.extend(Finding(obj, p) for p in problems)
            continue
        if obj.kind == routingpolicy.KIND:
            policies[obj.id] = _check_policy(obj, catalog, report, provider_hosts)
        else:
            parsed = parse_team_budget_spec(obj.spec)
            if isinstance(parsed, list):
                report.findings.extend(Finding(obj, p) for p in parsed)
            else:
                budgets.append((obj, parsed))
    namespaces = namespace_manifests(documents)
    consents = consents_from_namespaces(namespaces)
    known = {str(ns["metadata"].get("name")) for ns in namespaces}
    valid_budgets = []
    for obj, spec in budgets:
        problems = [
            p
            for p in team_budget_problems(spec, namespace=obj.namespace, policies=policies)
            if not _trusted_missing_ref(p, spec, obj, refs)
        ]
        problems += tenancy_problems(
            spec, obj.namespace, obj.name, consents=consents, policies=policies,
            known_namespaces=known,
        )  # fmt: skip
        report.findings.extend(Finding(obj, p) for p in problems)
        if not problems:
            valid_budgets.append((obj, spec))
    report.findings.extend(_overlaps(valid_budgets))
    report.findings.sort(key=lambda f: (f.source, f.object.document.index))
    return report


def _check_policy(
    obj: ManifestObject, catalog: PriceCatalog, report: Report, provider_hosts: ProviderHosts
) -> RoutingPolicySpec | None:
    parsed = parse_routing_policy_spec(obj.spec)
    problems = (
        parsed
        if isinstance(parsed, list)
        else routing_policy_problems(parsed, catalog, provider_hosts)
    )
    report.findings.extend(Finding(obj, p) for p in problems)
    return None if problems or isinstance(parsed, list) else parsed


def _trusted_missing_ref(
    problem: Problem, spec: TeamBudgetSpec, obj: ManifestObject, refs: RefPolicy
) -> bool:
    if problem.reason is not Reason.ROUTING_POLICY_NOT_FOUND:
        return False
    policy_id = policy_id_of(spec, obj.namespace)
    return policy_id is not None and refs.trusts(policy_id)


def _duplicates(objects: Iterable[ManifestObject]) -> list[Finding]:
    """The same object twice: the second apply silently replaces the first."""
    first: dict[tuple[str, str], ManifestObject] = {}
    findings = []
    for obj in objects:
        if not obj.name:
            continue
        key = (obj.kind, obj.id)
        if key in first:
            earlier = first[key].document
            findings.append(
                Finding(
                    obj,
                    Problem(
                        "metadata.name",
                        f"{obj.ref} is also defined in {earlier.source} (line {earlier.line}); "
                        "applying both keeps only the last one",
                    ),
                )
            )
        else:
            first[key] = obj
    return findings


def _overlaps(budgets: list[tuple[ManifestObject, TeamBudgetSpec]]) -> list[Finding]:
    """Each pair of budgets of one namespace that can select one workload there, reported
    on the later (by id)."""
    ordered = sorted(budgets, key=lambda pair: pair[0].id)
    findings = []
    for position, (obj, spec) in enumerate(ordered):
        for other, other_spec in ordered[:position]:
            # Attribution (policy.tenancy.attribute) prefers a budget in the workload's own
            # namespace to one the namespace consented to: only two budgets of that same
            # namespace are ambiguous, resolved silently by name.
            common = {
                ns
                for ns in shared_namespaces(spec, obj.namespace, other_spec, other.namespace)
                if ns == obj.namespace == other.namespace
            }
            if common:
                findings.append(
                    Finding(
                        obj,
                        Problem(
                            OVERLAP_FIELD,
                            f"selects the same workloads as {teambudget.KIND} {other.id} "
                            f"(namespace {', '.join(sorted(common))}): each call is charged to "
                            f"only one of them ({other.id}, the first by name); make the "
                            "namespaces or the selectors disjoint",
                        ),
                    )
                )
    return findings
