"""Tenancy (DESIGN T1/T2): which namespaces a budget governs, which references are granted,
and to which budget a workload belongs."""

from __future__ import annotations

from dataclasses import dataclass

from costwarden.api.conditions import Reason
from costwarden.api.meta import LabelSelector
from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.policy.tenancy import (
    BUDGET_ANNOTATION,
    attribute,
    consent_of,
    consents_from_namespaces,
    governed_namespaces,
    namespace_problems,
    reference_problem,
    tenancy_problems,
)
from costwarden.policy.validation import team_budget_problems


def _budget(**workloads: object) -> TeamBudgetSpec:
    return TeamBudgetSpec.model_validate({"hardCapUSD": 10, "workloads": workloads})


def _policy(grants: list[str] | None = None) -> RoutingPolicySpec:
    spec: dict[str, object] = {
        "models": [{"name": "m", "provider": "OpenAI", "endpoint": "https://x.example/v1",
                    "pricing": {"inputPerMTokUSD": "1", "outputPerMTokUSD": "1"}}],
        "defaultModel": "m",
    }  # fmt: skip
    if grants is not None:
        spec["grants"] = {"namespaces": grants}
    return RoutingPolicySpec.model_validate(spec)


def test_consent_is_read_from_the_annotation_and_must_name_one_budget():
    assert consent_of({BUDGET_ANNOTATION: "platform/shared"}) == "platform/shared"
    assert consent_of({BUDGET_ANNOTATION: " platform/shared "}) == "platform/shared"
    assert consent_of({BUDGET_ANNOTATION: "platform"}) is None
    assert consent_of({BUDGET_ANNOTATION: "a/b/c"}) is None
    assert consent_of({"other": "platform/shared"}) is None
    assert consent_of(None) is None
    bodies = [
        {"metadata": {"name": "ns-a", "annotations": {BUDGET_ANNOTATION: "p/b"}}},
        {"metadata": {"name": "ns-b"}},
        {"kind": "broken"},
    ]
    assert consents_from_namespaces(bodies) == {"ns-a": "p/b"}


def test_a_budget_governs_its_own_namespace_by_default():
    assert governed_namespaces(_budget(), "team-a", "b", {}) == ["team-a"]
    assert namespace_problems(_budget(), "team-a", "b", {}) == []


def test_an_unconsented_namespace_is_refused_naming_its_field_and_ignored():
    spec = _budget(namespaces=["team-a", "kube-system"])
    [problem] = namespace_problems(spec, "team-a", "b", {})
    assert problem.field == "spec.workloads.namespaces[1]"
    assert problem.reason is Reason.NAMESPACE_NOT_GRANTED
    assert "kube-system" in problem.message
    assert f"{BUDGET_ANNOTATION}: team-a/b" in problem.message
    assert governed_namespaces(spec, "team-a", "b", {}) == ["team-a"]


def test_a_typo_never_lifts_the_cap_of_the_budgets_own_namespace():
    spec = _budget(namespaces=["team-aa"])  # meant team-a
    assert governed_namespaces(spec, "team-a", "b", {}) == ["team-a"]


def test_consent_for_another_budget_is_no_consent():
    spec = _budget(namespaces=["shared"])
    consents = {"shared": "team-b/b"}
    [problem] = namespace_problems(spec, "team-a", "b", consents)
    assert "it names team-b/b" in problem.message
    assert governed_namespaces(spec, "team-a", "b", consents) == ["team-a"]


def test_a_consenting_namespace_is_governed():
    spec = _budget(namespaces=["platform", "batch"])
    consents = {"batch": "platform/all"}
    assert namespace_problems(spec, "platform", "all", consents) == []
    assert governed_namespaces(spec, "platform", "all", consents) == ["batch", "platform"]
    # A list without the own namespace governs only what it lists (when all is consented).
    only = _budget(namespaces=["batch"])
    assert governed_namespaces(only, "platform", "all", consents) == ["batch"]


def test_offline_a_claim_without_its_namespace_manifest_cannot_be_verified():
    spec = _budget(namespaces=["elsewhere", "known"])
    problems = namespace_problems(spec, "team-a", "b", {}, known_namespaces={"known"})
    assert [p.field for p in problems] == [
        "spec.workloads.namespaces[0]",
        "spec.workloads.namespaces[1]",
    ]
    assert "cannot be verified" in problems[0].message
    assert "does not consent" in problems[1].message


def _with_ref(namespace: str | None) -> TeamBudgetSpec:
    ref: dict[str, str] = {"name": "p"}
    if namespace is not None:
        ref["namespace"] = namespace
    return TeamBudgetSpec.model_validate({"hardCapUSD": 10, "routingPolicyRef": ref})


def test_a_reference_in_the_own_namespace_needs_no_grant():
    policies = {"team-a/p": _policy()}
    assert reference_problem(_with_ref(None), "team-a", policies) is None
    assert reference_problem(_with_ref("team-a"), "team-a", policies) is None


def test_a_cross_namespace_reference_needs_a_grant_naming_the_namespace():
    spec = _with_ref("platform")
    for grants in (None, [], ["team-b"]):
        problem = reference_problem(spec, "team-a", {"platform/p": _policy(grants)})
        assert problem is not None, grants
        assert problem.field == "spec.routingPolicyRef"
        assert problem.reason is Reason.REFERENCE_NOT_GRANTED
    assert reference_problem(spec, "team-a", {"platform/p": _policy(["team-a"])}) is None
    assert reference_problem(spec, "team-a", {"platform/p": _policy(["*"])}) is None


def test_an_ungranted_policy_reveals_nothing_of_its_models():
    spec = TeamBudgetSpec.model_validate({
        "hardCapUSD": 10, "routingPolicyRef": {"name": "p", "namespace": "platform"},
        "modelCaps": [{"model": "secret-model", "maxTokens": 5}],
    })  # fmt: skip
    policies: dict[str, RoutingPolicySpec | None] = {"platform/p": _policy()}
    assert team_budget_problems(spec, namespace="team-a", policies=policies) == []
    [problem] = tenancy_problems(spec, "team-a", "b", consents={}, policies=policies)
    assert problem.reason is Reason.REFERENCE_NOT_GRANTED


@dataclass(frozen=True)
class _Scope:
    id: str
    namespaces: list[str]
    selector: LabelSelector | None = None


def _selector(**labels: str) -> LabelSelector:
    return LabelSelector.model_validate({"matchLabels": labels})


def test_the_budget_in_the_workloads_own_namespace_wins():
    own = _Scope("team-a/own", ["team-a"])
    platform = _Scope("aaa/platform", ["team-a"])  # sorts first by id: must still lose
    assert attribute([platform, own], "team-a", {}) is own


def test_the_consented_budget_serves_what_the_own_budget_does_not_select():
    own = _Scope("team-a/own", ["team-a"], _selector(app="agent"))
    platform = _Scope("platform/all", ["team-a", "platform"])
    consents = {"team-a": "platform/all"}
    assert attribute([own, platform], "team-a", {"app": "agent"}, consents) is own
    assert attribute([own, platform], "team-a", {"app": "web"}, consents) is platform


def test_an_unconsented_budget_never_wins():
    attacker = _Scope("attacker/grab", ["victim"])
    assert attribute([attacker], "victim", {}, consents={}) is None
    assert attribute([attacker], "victim", {}, consents={"victim": "other/b"}) is None


def test_selectors_only_select_inside_governed_namespaces():
    scope = _Scope("team-a/b", ["team-a"], _selector(app="x"))
    assert attribute([scope], "team-b", {"app": "x"}) is None
    assert attribute([scope], "team-a", {"app": "y"}) is None
    assert attribute([scope], "team-a", {"app": "x"}) is scope


def test_overlapping_own_budgets_resolve_to_the_first_by_id():
    first, second = _Scope("ns/a", ["ns"]), _Scope("ns/b", ["ns"])
    assert attribute([second, first], "ns", {}) is first
