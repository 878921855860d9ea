"""Offline validation reaches the API server's verdict on every broken manifest."""

from __future__ import annotations

import pytest

from costwarden.api.catalog import default_catalog
from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.policy.validation import (
    parse_routing_policy_spec,
    parse_team_budget_spec,
    routing_policy_problems,
    team_budget_problems,
)
from tests.support.manifests import BrokenManifest, broken_manifests, example_documents

CASES = broken_manifests()


def test_the_table_is_large_enough():
    assert len(CASES) >= 15
    assert len({c.field + c.message for c in CASES}) == len(CASES), "each case is a new mistake"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_broken_manifest_is_refused_naming_its_field(case: BrokenManifest):
    parse = parse_team_budget_spec if case.kind == "TeamBudget" else parse_routing_policy_spec
    problems = parse(case.document["spec"])
    assert isinstance(problems, list), f"{case.id} was accepted"
    matching = [p for p in problems if p.field == case.field]
    assert matching, f"no problem names {case.field}: {problems}"
    assert any(case.python_message.lower() in p.message.lower() for p in matching), matching


def test_examples_are_valid():
    documents = example_documents()
    policies = {}
    for doc in documents:
        if doc["kind"] == "RoutingPolicy":
            spec = parse_routing_policy_spec(doc["spec"])
            assert isinstance(spec, RoutingPolicySpec), spec
            assert routing_policy_problems(spec, default_catalog()) == []
            policies[f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"] = spec
    budgets = [d for d in documents if d["kind"] == "TeamBudget"]
    assert len(budgets) == 2
    for doc in budgets:
        spec = parse_team_budget_spec(doc["spec"])
        assert not isinstance(spec, list), spec
        problems = team_budget_problems(
            spec, namespace=doc["metadata"]["namespace"], policies=policies
        )
        assert problems == []


def _budget(**spec):
    parsed = parse_team_budget_spec({"hardCapUSD": 100, **spec})
    assert not isinstance(parsed, list), parsed
    return parsed


def _policy(**spec):
    base = {
        "models": [
            {"name": "a", "provider": "OpenAI", "endpoint": "https://a.example/v1"},
            {
                "name": "b",
                "provider": "Anthropic",
                "endpoint": "https://b.example",
                "pricing": {"inputPerMTokUSD": 1, "outputPerMTokUSD": 2},
            },
        ],
        "defaultModel": "a",
    }
    parsed = parse_routing_policy_spec({**base, **spec})
    assert not isinstance(parsed, list), parsed
    return parsed


def test_unknown_time_zone_names_the_field():
    problems = team_budget_problems(
        _budget(period={"timeZone": "Mars/Olympus"}), namespace="ns", policies={}
    )
    assert [p.field for p in problems] == ["spec.period.timeZone"]
    assert "Mars/Olympus" in problems[0].message


def test_missing_routing_policy_is_reported_with_its_reason():
    spec = _budget(routingPolicyRef={"name": "nope"})
    problems = team_budget_problems(spec, namespace="ns", policies={})
    assert problems[0].reason == "RoutingPolicyNotFound"
    assert "ns/nope" in problems[0].message


def test_invalid_routing_policy_makes_the_budget_not_ready():
    spec = _budget(routingPolicyRef={"name": "p", "namespace": "shared"})
    problems = team_budget_problems(spec, namespace="ns", policies={"shared/p": None})
    assert problems[0].reason == "RoutingPolicyNotReady"


def test_model_cap_on_an_undeclared_model_is_reported():
    spec = _budget(routingPolicyRef={"name": "p"}, modelCaps=[{"model": "z", "maxTokens": 5}])
    problems = team_budget_problems(spec, namespace="ns", policies={"ns/p": _policy()})
    assert [p.field for p in problems] == ["spec.modelCaps[0].model"]


def test_model_without_price_is_reported():
    policy = _policy(
        models=[{"name": "mystery", "provider": "OpenAI", "endpoint": "https://x.example/v1"}],
        defaultModel="mystery",
    )
    problems = routing_policy_problems(policy, default_catalog())
    assert [p.field for p in problems] == ["spec.models[0].pricing"]


def test_fallback_across_wire_formats_is_reported():
    policy = _policy(
        models=[
            {"name": "gpt-4.1", "provider": "OpenAI", "endpoint": "https://a.example/v1"},
            {
                "name": "claude",
                "provider": "Anthropic",
                "endpoint": "https://b.example",
                "upstreamModel": "claude-haiku-4-5",
            },
        ],
        defaultModel="gpt-4.1",
        rules=[{"name": "r", "model": "gpt-4.1", "fallbacks": ["claude"]}],
    )
    problems = routing_policy_problems(policy, default_catalog())
    assert [p.field for p in problems] == ["spec.rules[0].fallbacks[0]"]
