"""Which model serves a call, and why: the one place routing is decided (pure, no I/O).

The gateway compiles each :class:`PolicyConfig` once per configuration reload
(:func:`compile_policy`) and calls :func:`decide` per request. The operator and
``costwarden validate`` call :func:`mixed_provider_routes` to flag rules whose fallbacks
speak another wire format.

Decisions, in order:

1. The first rule whose match holds wins; otherwise the policy's default model.
2. If the budget is SoftLimited, a ``softLimitDowngrades`` entry replaces the model (and
   each fallback) by a cheaper one.
3. Prompt-cache affinity puts the model that served the session before first.
4. Only models speaking the request's wire format are kept: costwarden does not translate
   between OpenAI and Anthropic formats. If the chosen model speaks the other format,
   the call is refused (``incompatible_route``).
5. Confidential calls never leave the cluster: if the chosen model is not InCluster the
   call is refused; External fallbacks (and downgrades to External models) are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from costwarden.api.gatewayconfig import ModelRoute, PolicyConfig
from costwarden.api.routingpolicy import Locality, Provider, RoutingRule, Sensitivity

DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class RequestTraits:
    """What the gateway knows of a call before sending it anywhere."""

    provider: Provider
    """The wire format the client spoke."""
    requested_model: str = ""
    task: str = ""
    prompt_tokens: int = 0
    """Estimated (bytes / 4): rules with token bounds are coarse by design."""
    has_tools: bool = False
    sensitivity: Sensitivity = Sensitivity.INTERNAL


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a call goes: ``model`` first, then ``fallbacks`` in order."""

    model: ModelRoute
    fallbacks: tuple[ModelRoute, ...]
    rule: str
    reason: str
    downgraded_from: str = ""

    @property
    def candidates(self) -> tuple[ModelRoute, ...]:
        return (self.model, *self.fallbacks)


@dataclass(frozen=True, slots=True)
class RouteRefusal:
    """The call cannot be routed; ``code`` is a RefusalReason value."""

    code: str
    message: str
    rule: str


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy with its lookups precomputed, built once per configuration reload."""

    policy: PolicyConfig
    models: dict[str, ModelRoute]
    downgrades: dict[str, str]
    rules: tuple[RoutingRule, ...] = field(default=())

    @property
    def affinity(self) -> bool:
        return self.policy.prompt_cache_affinity


def compile_policy(policy: PolicyConfig) -> CompiledPolicy:
    return CompiledPolicy(
        policy=policy,
        models={m.name: m for m in policy.models},
        downgrades={d.from_model: d.to_model for d in policy.soft_limit_downgrades},
        rules=tuple(policy.rules),
    )


def rule_matches(rule: RoutingRule, traits: RequestTraits) -> bool:
    """Every trait the rule names must hold; an empty match matches every call."""
    m = rule.match
    if m.tasks and traits.task not in m.tasks:
        return False
    if m.requested_models and traits.requested_model not in m.requested_models:
        return False
    if m.min_prompt_tokens is not None and traits.prompt_tokens < m.min_prompt_tokens:
        return False
    if m.max_prompt_tokens is not None and traits.prompt_tokens > m.max_prompt_tokens:
        return False
    if m.has_tools is not None and traits.has_tools != m.has_tools:
        return False
    return not (m.sensitivities and traits.sensitivity not in m.sensitivities)


def decide(
    compiled: CompiledPolicy,
    traits: RequestTraits,
    *,
    soft_limited: bool = False,
    pinned_model: str = "",
    prefer_requested: bool = False,
) -> RouteDecision | RouteRefusal:
    """The route for one call, or why it has none (see the module docstring for the order).

    ``prefer_requested`` (embeddings): when no rule matches and the client named a model the
    policy declares, that model serves instead of the default, which is a chat model.
    """
    rule = next((r for r in compiled.rules if rule_matches(r, traits)), None)
    rule_name = rule.name if rule else DEFAULT_RULE
    names = [rule.model, *rule.fallbacks] if rule else [compiled.policy.default_model]
    reason = f"rule {rule_name}" if rule else "no rule matched; default model"
    if rule is None and prefer_requested and traits.requested_model in compiled.models:
        names, reason = [traits.requested_model], "no rule matched; requested model"
    downgraded_from = ""
    if soft_limited:
        names, downgraded_from = _downgrade(names, compiled, traits)
        if downgraded_from:
            reason += f"; soft limit: {downgraded_from} downgraded to {names[0]}"
    if pinned_model and compiled.affinity and pinned_model in names and names[0] != pinned_model:
        names = [pinned_model, *(n for n in names if n != pinned_model)]
        reason += "; session affinity"
    routes = [compiled.models[n] for n in _unique(names) if n in compiled.models]
    if not routes:
        return RouteRefusal(
            "no_routing_policy", f"rule {rule_name} names no known model", rule_name
        )
    return _constrain(routes, traits, rule_name, reason, downgraded_from)


def _downgrade(
    names: list[str], compiled: CompiledPolicy, traits: RequestTraits
) -> tuple[list[str], str]:
    """Each model replaced by its soft-limit downgrade, except that a Confidential call is
    never downgraded out of the cluster (the budget is better overrun than the data leaked)."""
    confidential = traits.sensitivity is Sensitivity.CONFIDENTIAL

    def allowed(name: str) -> bool:
        route = compiled.models.get(name)
        return not confidential or (route is not None and route.locality is Locality.IN_CLUSTER)

    replaced = [
        compiled.downgrades[n]
        if n in compiled.downgrades and allowed(compiled.downgrades[n])
        else n
        for n in names
    ]
    first = names[0] if replaced[0] != names[0] else ""
    return replaced, first


def _constrain(
    routes: list[ModelRoute],
    traits: RequestTraits,
    rule_name: str,
    reason: str,
    downgraded_from: str,
) -> RouteDecision | RouteRefusal:
    primary = routes[0]
    if primary.provider is not traits.provider:
        return RouteRefusal(
            "incompatible_route",
            f"rule {rule_name} routes this {traits.provider.value}-format call to model "
            f"{primary.name}, which speaks the {primary.provider.value} format; costwarden does "
            "not translate between formats: route it to a model of the same provider",
            rule_name,
        )
    confidential = traits.sensitivity is Sensitivity.CONFIDENTIAL
    if confidential and primary.locality is not Locality.IN_CLUSTER:
        return RouteRefusal(
            "confidential_requires_in_cluster",
            f"Confidential calls only go to InCluster models, and rule {rule_name} routes this "
            f"call to {primary.name} ({primary.locality.value}); add a rule matching "
            "sensitivities [Confidential] that routes to an InCluster model",
            rule_name,
        )
    fallbacks = tuple(
        r
        for r in routes[1:]
        if r.provider is traits.provider and (not confidential or r.locality is Locality.IN_CLUSTER)
    )
    return RouteDecision(primary, fallbacks, rule_name, reason, downgraded_from)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def mixed_provider_routes(policy: PolicyConfig) -> list[str]:
    """Rules (and the default) whose fallbacks or downgrades speak another wire format.

    Such a fallback can never serve a call (the gateway skips it), which is almost always a
    mistake in the policy; the operator reports it in the policy's Ready condition.
    """
    compiled = compile_policy(policy)
    problems: list[str] = []
    for rule in policy.rules:
        chain = [rule.model, *rule.fallbacks]
        chain += [compiled.downgrades[n] for n in chain if n in compiled.downgrades]
        providers = {compiled.models[n].provider for n in chain if n in compiled.models}
        if len(providers) > 1:
            problems.append(
                f"rules[{rule.name}]: model, fallbacks and downgrades mix providers "
                f"({', '.join(sorted(p.value for p in providers))}); costwarden does not "
                "translate between wire formats"
            )
    return problems
