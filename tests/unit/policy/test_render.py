"""The operator's whole decision, without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from costwarden.api.catalog import default_catalog
from costwarden.api.teambudget import BudgetPhase
from costwarden.policy.render import ObservedObject, reconcile, serialize
from tests.support.manifests import example_documents

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def observed(doc: dict[str, Any], status: dict[str, Any] | None = None) -> ObservedObject:
    meta = doc["metadata"]
    return ObservedObject(meta.get("namespace", "ns"), meta["name"], 1, doc["spec"], status or {})


def world() -> tuple[list[ObservedObject], list[ObservedObject]]:
    docs = example_documents()
    budgets = [observed(d) for d in docs if d["kind"] == "TeamBudget"]
    policies = [observed(d) for d in docs if d["kind"] == "RoutingPolicy"]
    return budgets, policies


def test_examples_render_both_teams_and_the_policy():
    budgets, policies = world()
    result = reconcile(budgets, policies, default_catalog(), NOW)
    assert [t.id for t in result.config.teams] == ["team-payments/payments", "team-support/support"]
    assert [p.id for p in result.config.policies] == ["ai-platform/standard"]
    assert all(v.ready for v in result.budgets.values())
    assert result.policies["ai-platform/standard"].teams == 2
    payments = result.config.team("team-payments/payments")
    assert payments is not None
    assert str(payments.soft_limit_usd) == "400"
    assert payments.spend.phase is BudgetPhase.ACTIVE
    in_cluster = result.config.policy("ai-platform/standard").model("llama-in-cluster")
    assert str(in_cluster.pricing.cached_input_per_m_tok_usd) == "0.10"


def test_rendering_is_deterministic_whatever_the_order():
    budgets, policies = world()
    one = reconcile(budgets, policies, default_catalog(), NOW).config
    two = reconcile(budgets[::-1], policies[::-1], default_catalog(), NOW).config
    assert serialize(one) == serialize(two)
    assert one.revision == two.revision != ""


def test_revision_changes_with_content():
    budgets, policies = world()
    before = reconcile(budgets, policies, default_catalog(), NOW).config
    changed = ObservedObject(
        budgets[0].namespace, budgets[0].name, 2, {**budgets[0].spec, "hardCapUSD": 501}
    )
    after = reconcile([changed, *budgets[1:]], policies, default_catalog(), NOW).config
    assert after.revision != before.revision


def test_an_invalid_policy_is_left_out_and_its_teams_are_not_ready():
    budgets, policies = world()
    broken = ObservedObject(
        policies[0].namespace, policies[0].name, 3, {**policies[0].spec, "defaultModel": "nope"}
    )
    result = reconcile(budgets, [broken], default_catalog(), NOW)
    assert result.config.policies == []
    assert result.config.teams == []  # never half-applied
    assert not result.policies[broken.id].ready
    assert "spec.defaultModel" in result.policies[broken.id].message
    assert {v.reason for v in result.budgets.values()} == {"RoutingPolicyNotReady"}


def test_spend_of_the_current_period_drives_the_phase():
    budgets, policies = world()
    payments = budgets[0]
    status = {
        "spentUSD": "450.00",
        "currentPeriod": {"start": "2026-10-31T23:00:00Z", "end": "2026-11-30T23:00:00Z"},
    }
    spending = ObservedObject(payments.namespace, payments.name, 1, payments.spec, status)
    result = reconcile([spending, *budgets[1:]], policies, default_catalog(), NOW)
    team = result.config.team(payments.id)
    assert team.spend.phase is BudgetPhase.SOFT_LIMITED
    assert str(team.spend.spent_usd) == "450.00"


def test_spend_of_a_closed_period_does_not_count():
    budgets, policies = world()
    payments = budgets[0]
    status = {
        "spentUSD": "499.00",
        "currentPeriod": {"start": "2026-09-30T22:00:00Z", "end": "2026-10-31T23:00:00Z"},
    }
    stale = ObservedObject(payments.namespace, payments.name, 1, payments.spec, status)
    result = reconcile([stale], policies, default_catalog(), NOW)
    team = result.config.team(payments.id)
    assert team.spend.spent_usd == 0
    assert team.spend.phase is BudgetPhase.ACTIVE


def test_a_budget_without_policy_is_ready_but_says_calls_are_refused():
    result = reconcile(
        [ObservedObject("ns", "solo", 1, {"hardCapUSD": 5})], [], default_catalog(), NOW
    )
    verdict = result.budgets["ns/solo"]
    assert verdict.ready
    assert verdict.reason == "NoRoutingPolicy"
    assert result.config.team("ns/solo").routing_policy is None


def _without_grants(policies: list[ObservedObject]) -> list[ObservedObject]:
    spec = {k: v for k, v in policies[0].spec.items() if k != "grants"}
    return [ObservedObject(policies[0].namespace, policies[0].name, 2, spec)]


def test_an_ungranted_reference_is_not_ready_and_routes_nothing():
    budgets, policies = world()
    result = reconcile(budgets, _without_grants(policies), default_catalog(), NOW)
    verdict = result.budgets["team-payments/payments"]
    assert not verdict.ready
    assert verdict.reason == "ReferenceNotGranted"
    assert [p.field for p in verdict.problems] == ["spec.routingPolicyRef"]
    team = result.config.team("team-payments/payments")
    assert team is not None, "still capped: its calls are attributed to it and refused"
    assert team.routing_policy is None
    assert team.namespaces == ["team-payments"]
    assert result.policies["ai-platform/standard"].teams == 0


def _claiming(namespaces: list[str]) -> ObservedObject:
    spec = {"hardCapUSD": 0, "workloads": {"namespaces": namespaces},
            "onHardCap": {"jobs": "Delete"}}  # fmt: skip
    return ObservedObject("attacker", "grab", 1, spec)


def test_an_unconsented_namespace_is_not_ready_and_left_out_of_the_team():
    result = reconcile([_claiming(["kube-system"])], [], default_catalog(), NOW)
    verdict = result.budgets["attacker/grab"]
    assert (verdict.ready, verdict.reason) == (False, "NamespaceNotGranted")
    assert verdict.problems[0].field == "spec.workloads.namespaces[0]"
    team = result.config.team("attacker/grab")
    assert team is not None  # its own namespace stays capped
    assert team.namespaces == ["attacker"]
    assert result.config.team_for_workload("kube-system", {}) is None


def test_consent_lets_a_budget_govern_a_namespace_and_attribution_prefers_the_own_budget():
    selector = {"matchLabels": {"team": "batch"}}
    own = ObservedObject("batch", "own", 1, {"hardCapUSD": 5, "workloads": {"selector": selector}})
    platform = ObservedObject(
        "platform", "all", 1, {"hardCapUSD": 50, "workloads": {"namespaces": ["platform", "batch"]}}
    )
    consents = {"batch": "platform/all"}
    result = reconcile([own, platform], [], default_catalog(), NOW, consents=consents)
    assert result.budgets["platform/all"].reason == "NoRoutingPolicy"
    assert result.config.team("platform/all").namespaces == ["batch", "platform"]
    assert result.config.team_for_workload("batch", {"team": "batch"}).id == "batch/own"
    assert result.config.team_for_workload("batch", {"team": "x"}).id == "platform/all"
    # Consent withdrawn: the namespace is the platform budget's no more.
    withdrawn = reconcile([own, platform], [], default_catalog(), NOW, consents={})
    assert withdrawn.config.team("platform/all").namespaces == ["platform"]
    assert withdrawn.config.team_for_workload("batch", {"team": "x"}) is None


def test_a_restricted_budget_keeps_its_phase_with_ready_false():
    from decimal import Decimal

    from costwarden.policy.status import budget_status

    result = reconcile([_claiming(["kube-system"])], [], default_catalog(), NOW)
    status = budget_status(result.budgets["attacker/grab"], {}, 1, Decimal(0), NOW)
    assert status["phase"] == "Exhausted"  # a zero cap: its own namespace is stopped
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NamespaceNotGranted")
    assert "spec.workloads.namespaces[0]" in ready["message"]


def test_per_model_spend_of_capped_models_is_rendered_for_reservations():
    budgets, policies = world()
    support = next(b for b in budgets if b.name == "support")
    status = {
        "spentUSD": "12.00",
        "currentPeriod": {"start": "2026-11-25T05:00:00Z", "end": "2026-11-26T05:00:00Z"},
        "byModel": [
            {"model": "gpt-4.1-mini", "spentUSD": "3", "tokens": 10, "requests": 1},
            {"model": "gpt-4.1", "spentUSD": "9", "tokens": 20, "requests": 2},
        ],
    }
    spending = ObservedObject(support.namespace, support.name, 1, support.spec, status)
    others = [b for b in budgets if b.name != "support"]
    team = reconcile([spending, *others], policies, default_catalog(), NOW).config.team(support.id)
    # Only gpt-4.1 has a modelCaps entry: only its spend is carried.
    assert [(m.model, str(m.spent_usd), m.tokens) for m in team.spend.models] == [
        ("gpt-4.1", "9", 20)
    ]
    payments = reconcile(budgets, policies, default_catalog(), NOW).config.team(budgets[0].id)
    assert payments.spend.models == []
