"""Request classes: every kind of call two routing policies can tell apart, and where each goes.

A rule matches on a few traits (wire format, task, sensitivity, tools, requested model,
prompt size). Taking every value the rules of *both* policies name, plus "any other"
for open-ended traits, and cutting prompt sizes at every rule threshold, gives a finite
set of classes such that all calls of a class are routed alike by either policy. Each
class is then routed by ``policy.routing.decide`` under the old and the new policy, so
the comparison is the gateway's own decision, not a re-implementation of it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from costwarden.api.gatewayconfig import PolicyConfig
from costwarden.api.routingpolicy import Provider, Sensitivity
from costwarden.policy.routing import RequestTraits, RouteDecision, compile_policy, decide

OTHER = ""
"""A task or requested model no rule names (or none at all)."""


@dataclass(frozen=True)
class Route:
    """Where a class of calls goes: a model, or a refusal."""

    model: str = ""
    rule: str = ""
    refusal: str = ""

    def __str__(self) -> str:
        if self.refusal:
            return f"refused ({self.refusal})"
        return f"{self.model} (rule {self.rule})"


Bucket = tuple[int, int | None]
"""Prompt tokens from the first value up to the second (None: unbounded)."""


@dataclass(frozen=True)
class RequestClass:
    """A set of calls: each field holds the values of its trait the calls may have; an
    empty tuple means every value (the trait does not matter)."""

    provider: tuple[Provider, ...]
    task: tuple[str, ...]
    sensitivity: tuple[Sensitivity, ...]
    has_tools: tuple[bool, ...]
    requested_model: tuple[str, ...]
    prompt_bucket: tuple[Bucket, ...]

    def describe(self) -> str:
        parts = []
        if self.provider:
            parts.append(_either(f"{p.value}-format" for p in self.provider) + " calls")
        if self.task:
            parts.append("task " + _either(t or "(other or none)" for t in self.task))
        if self.sensitivity:
            parts.append(_either(s.value for s in self.sensitivity))
        if self.has_tools:
            parts.append(_either("with tools" if t else "without tools" for t in self.has_tools))
        if self.requested_model:
            parts.append(
                "asking for " + _either(m or "another model" for m in self.requested_model)
            )
        if self.prompt_bucket:
            parts.append(
                "prompts of " + _either(_bucket(b) for b in self.prompt_bucket) + " tokens"
            )
        return ", ".join(parts) if parts else "every call"


def _either(values: Iterable[str]) -> str:
    items = list(values)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _bucket(bucket: Bucket) -> str:
    low, high = bucket
    return f"{low}+" if high is None else f"{low}-{high}"


@dataclass(frozen=True)
class ClassChange:
    request_class: RequestClass
    old: Route
    new: Route


@dataclass(frozen=True)
class Domains:
    providers: tuple[Provider, ...]
    tasks: tuple[str, ...]
    sensitivities: tuple[Sensitivity, ...]
    tools: tuple[bool, ...]
    requested_models: tuple[str, ...]
    prompt_buckets: tuple[Bucket, ...]

    def size(self) -> int:
        return (
            len(self.providers)
            * len(self.tasks)
            * len(self.sensitivities)
            * len(self.tools)
            * len(self.requested_models)
            * len(self.prompt_buckets)
        )


def domains(policies: Iterable[PolicyConfig]) -> Domains:
    tasks: set[str] = set()
    models: set[str] = set()
    bounds = {0}
    for policy in policies:
        for rule in policy.rules:
            tasks.update(rule.match.tasks)
            models.update(rule.match.requested_models)
            if rule.match.min_prompt_tokens is not None:
                bounds.add(rule.match.min_prompt_tokens)
            if rule.match.max_prompt_tokens is not None:
                bounds.add(rule.match.max_prompt_tokens + 1)
    edges = sorted(bounds)
    buckets = tuple(
        (low, edges[i + 1] - 1 if i + 1 < len(edges) else None) for i, low in enumerate(edges)
    )
    return Domains(
        providers=tuple(Provider),
        tasks=(*sorted(tasks), OTHER),
        sensitivities=tuple(Sensitivity),
        tools=(False, True),
        requested_models=(*sorted(models), OTHER),
        prompt_buckets=buckets,
    )


def route(policy: PolicyConfig | None, traits: RequestTraits) -> Route:
    if policy is None:
        return Route(refusal="no_routing_policy")
    decision = decide(compile_policy(policy), traits)
    if isinstance(decision, RouteDecision):
        return Route(model=decision.model.name, rule=decision.rule)
    return Route(rule=decision.rule, refusal=decision.code)


def changed_classes(old: PolicyConfig | None, new: PolicyConfig | None) -> list[ClassChange]:
    """Every class whose model (or refusal) differs between the two policies, merged into
    as few classes as possible (a trait whose every value changes alike reads "any")."""
    dims = domains(p for p in (old, new) if p is not None)
    changes = []
    for provider, task, sensitivity, tools, model, bucket in itertools.product(
        dims.providers,
        dims.tasks,
        dims.sensitivities,
        dims.tools,
        dims.requested_models,
        dims.prompt_buckets,
    ):
        traits = RequestTraits(
            provider=provider,
            requested_model=model,
            task=task,
            prompt_tokens=bucket[0],
            has_tools=tools,
            sensitivity=sensitivity,
        )
        before, after = route(old, traits), route(new, traits)
        if _target(before) != _target(after):
            cls = RequestClass((provider,), (task,), (sensitivity,), (tools,), (model,), (bucket,))
            changes.append(ClassChange(cls, before, after))
    return _merge(changes, dims)


def _target(route: Route) -> str:
    return route.refusal or route.model


_FIELDS = ("provider", "task", "sensitivity", "has_tools", "requested_model", "prompt_bucket")
_DOMAIN_OF = {
    "provider": "providers",
    "task": "tasks",
    "sensitivity": "sensitivities",
    "has_tools": "tools",
    "requested_model": "requested_models",
    "prompt_bucket": "prompt_buckets",
}


def _merge(changes: Sequence[ClassChange], dims: Domains) -> list[ClassChange]:
    """Classes that differ in one trait only and move alike become one class listing the
    values of that trait (or none, when they are all of its values). Two passes suffice
    for the policies people write."""
    current = list(changes)
    for _ in range(2):
        for name in _FIELDS:
            current = _merge_on(current, name, getattr(dims, _DOMAIN_OF[name]))
    return current


def _merge_on(changes: list[ClassChange], name: str, domain: tuple[Any, ...]) -> list[ClassChange]:
    groups: dict[tuple[object, ...], list[ClassChange]] = defaultdict(list)
    for change in changes:
        key = (replace(change.request_class, **{name: ()}), change.old, change.new)
        groups[key].append(change)
    merged = []
    for members in groups.values():
        if any(not getattr(m.request_class, name) for m in members):
            merged.extend(members)  # already "every value": nothing to add
            continue
        values = {v for m in members for v in getattr(m.request_class, name)}
        ordered = () if values == set(domain) else tuple(v for v in domain if v in values)
        first = members[0]
        merged.append(
            ClassChange(replace(first.request_class, **{name: ordered}), first.old, first.new)
        )
    return merged
