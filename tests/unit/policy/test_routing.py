"""policy.routing: first matching rule, soft-limit downgrades, affinity, formats, confidential."""

from __future__ import annotations

import pytest

from costwarden.api.routingpolicy import Provider, Sensitivity
from costwarden.policy.routing import (
    RequestTraits,
    RouteDecision,
    RouteRefusal,
    compile_policy,
    decide,
    mixed_provider_routes,
)
from costwarden.testing.gateway import sample_config

POLICY = compile_policy(sample_config("http://upstream").policies[0])


def route(traits: RequestTraits, **kwargs: object) -> RouteDecision:
    decision = decide(POLICY, traits, **kwargs)  # type: ignore[arg-type]
    assert isinstance(decision, RouteDecision), decision
    return decision


def names(decision: RouteDecision) -> list[str]:
    return [m.name for m in decision.candidates]


OPENAI = RequestTraits(Provider.OPENAI, requested_model="gpt-4o")


def test_no_rule_matched_uses_the_default_model() -> None:
    decision = route(OPENAI)

    assert names(decision) == ["gpt-4o-mini"]
    assert decision.rule == "default"


def test_first_matching_rule_wins_with_its_fallbacks() -> None:
    decision = route(RequestTraits(Provider.OPENAI, task="code-review"))

    assert names(decision) == ["gpt-4o", "gpt-4o-mini"]
    assert decision.rule == "code-review"


def test_soft_limit_downgrades_the_model() -> None:
    decision = route(RequestTraits(Provider.OPENAI, task="code-review"), soft_limited=True)

    assert decision.model.name == "gpt-4o-mini"
    assert decision.downgraded_from == "gpt-4o"
    assert "soft limit" in decision.reason


def test_session_affinity_puts_the_pinned_model_first() -> None:
    decision = route(RequestTraits(Provider.OPENAI, task="code-review"), pinned_model="gpt-4o-mini")

    assert names(decision) == ["gpt-4o-mini", "gpt-4o"]
    assert "affinity" in decision.reason


def test_affinity_never_pins_a_model_outside_the_decision() -> None:
    decision = route(OPENAI, pinned_model="gpt-4o")

    assert names(decision) == ["gpt-4o-mini"]


def test_confidential_goes_to_the_in_cluster_rule() -> None:
    decision = route(RequestTraits(Provider.OPENAI, sensitivity=Sensitivity.CONFIDENTIAL))

    assert names(decision) == ["local-llama"]
    assert decision.rule == "confidential"


def test_confidential_without_an_in_cluster_route_is_refused() -> None:
    config = sample_config("http://upstream")
    config.policies[0].rules = config.policies[0].rules[1:]
    decision = decide(
        compile_policy(config.policies[0]),
        RequestTraits(Provider.OPENAI, sensitivity=Sensitivity.CONFIDENTIAL),
    )

    assert isinstance(decision, RouteRefusal)
    assert decision.code == "confidential_requires_in_cluster"


def test_confidential_drops_external_fallbacks_and_downgrades() -> None:
    config = sample_config("http://upstream")
    policy = config.policies[0]
    policy.rules[0].fallbacks = ["gpt-4o"]
    policy.soft_limit_downgrades[0].from_model = "local-llama"
    confidential = RequestTraits(Provider.OPENAI, sensitivity=Sensitivity.CONFIDENTIAL)

    decision = decide(compile_policy(policy), confidential, soft_limited=True)

    assert isinstance(decision, RouteDecision)
    assert [m.name for m in decision.candidates] == ["local-llama"]
    assert decision.downgraded_from == ""


def test_a_route_to_the_other_wire_format_is_refused() -> None:
    decision = decide(POLICY, RequestTraits(Provider.ANTHROPIC, requested_model="claude-x"))

    assert isinstance(decision, RouteRefusal)
    assert decision.code == "incompatible_route"
    assert "does not translate" in decision.message


def test_anthropic_rule_routes_anthropic_calls() -> None:
    decision = route(RequestTraits(Provider.ANTHROPIC, requested_model="claude-fake-sonnet"))

    assert names(decision) == ["claude-sonnet", "claude-haiku"]


@pytest.mark.parametrize(
    ("traits", "matches"),
    [
        (RequestTraits(Provider.OPENAI, prompt_tokens=10), False),
        (RequestTraits(Provider.OPENAI, prompt_tokens=5000), True),
        (RequestTraits(Provider.OPENAI, prompt_tokens=5000, has_tools=True), False),
    ],
)
def test_prompt_size_and_tools_traits(traits: RequestTraits, matches: bool) -> None:
    config = sample_config("http://upstream")
    policy = config.policies[0]
    policy.rules.insert(
        0,
        policy.rules[2].model_copy(
            update={
                "name": "long",
                "match": policy.rules[2].match.model_copy(
                    update={"tasks": [], "min_prompt_tokens": 1000, "has_tools": False}
                ),
            }
        ),
    )

    decision = decide(compile_policy(policy), traits)

    assert isinstance(decision, RouteDecision)
    assert (decision.rule == "long") is matches


def test_embeddings_prefer_the_requested_declared_model() -> None:
    traits = RequestTraits(Provider.OPENAI, requested_model="text-embedding-3-small")

    assert route(traits, prefer_requested=True).model.name == "text-embedding-3-small"
    assert route(traits).model.name == "gpt-4o-mini"


def test_mixed_provider_routes_are_reported() -> None:
    config = sample_config("http://upstream")
    policy = config.policies[0]
    assert mixed_provider_routes(policy) == []

    policy.rules[2].fallbacks = ["claude-haiku"]

    problems = mixed_provider_routes(policy)
    assert len(problems) == 1
    assert "rules[code-review]" in problems[0]
