"""Whether a TeamBudget or RoutingPolicy can be applied, and if not, which field is at fault.

Three layers, one verdict: (1) the pydantic models check the schema and the cross-field
CEL rules, exactly as the API server does; (2) this module checks what CEL cannot see
(time zones, prices in the catalogue, references between objects); (3) the operator writes
the problems into the object's Ready condition, and ``costwarden validate`` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from costwarden.api.catalog import PriceCatalog
from costwarden.api.conditions import Reason
from costwarden.api.endpoints import ANY_HOST, ProviderHosts, url_hostname
from costwarden.api.routingpolicy import Locality, RoutingPolicySpec
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.policy.periods import is_valid_time_zone
from costwarden.policy.pricing import resolve_pricing


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an object: the field at fault and a sentence saying why."""

    field: str
    message: str
    reason: Reason = Reason.INVALID_SPEC

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def schema_problems(error: ValidationError, prefix: str = "spec") -> list[Problem]:
    """Pydantic's errors as Problems with Kubernetes-style field paths (spec.rules[0].model)."""
    problems = []
    for err in error.errors():
        path = _field_path(prefix, err["loc"])
        # A cross-field rule names its field the way the API server does (fieldPath).
        path += str(err.get("ctx", {}).get("field_path", ""))
        problems.append(Problem(path, err["msg"]))
    return problems


def _field_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_team_budget_spec(raw: Mapping[str, Any]) -> TeamBudgetSpec | list[Problem]:
    try:
        return TeamBudgetSpec.model_validate(raw)
    except ValidationError as error:
        return schema_problems(error)


def parse_routing_policy_spec(raw: Mapping[str, Any]) -> RoutingPolicySpec | list[Problem]:
    try:
        return RoutingPolicySpec.model_validate(raw)
    except ValidationError as error:
        return schema_problems(error)


def routing_policy_problems(
    spec: RoutingPolicySpec,
    catalog: PriceCatalog,
    provider_hosts: ProviderHosts = ANY_HOST,
) -> list[Problem]:
    """What the API server's schema cannot check in a RoutingPolicy."""
    problems: list[Problem] = []
    for index, model in enumerate(spec.models):
        if model.locality is Locality.EXTERNAL and not provider_hosts.allows_url(model.endpoint):
            problems.append(
                Problem(
                    f"spec.models[{index}].endpoint",
                    f"host {url_hostname(model.endpoint)!r} of External model {model.name!r} "
                    "is not one of the provider hosts the cluster admin allows "
                    f"({provider_hosts.describe()})",
                    Reason.PROVIDER_HOST_NOT_ALLOWED,
                )
            )
    for index, model in enumerate(spec.models):
        if resolve_pricing(model, catalog) is None:
            problems.append(
                Problem(
                    f"spec.models[{index}].pricing",
                    f"model {model.name!r} has no pricing and upstream model "
                    f"{model.upstream_id!r} is not in the price catalogue; set pricing",
                )
            )
    problems.extend(_cross_provider_problems(spec))
    return problems


def _cross_provider_problems(spec: RoutingPolicySpec) -> list[Problem]:
    """A fallback must speak the same wire format as the model it stands in for: the
    gateway forwards the client's request body as it is and does not translate formats."""
    problems = []
    for index, rule in enumerate(spec.rules):
        primary = spec.model(rule.model)
        for position, name in enumerate(rule.fallbacks):
            fallback = spec.model(name)
            if primary and fallback and fallback.provider != primary.provider:
                problems.append(
                    Problem(
                        f"spec.rules[{index}].fallbacks[{position}]",
                        f"fallback {name!r} speaks {fallback.provider.value} but rule model "
                        f"{rule.model!r} speaks {primary.provider.value}; calls cannot fall "
                        "back across wire formats",
                    )
                )
    for index, downgrade in enumerate(spec.soft_limit_downgrades):
        source, target = spec.model(downgrade.from_model), spec.model(downgrade.to_model)
        if source and target and source.provider != target.provider:
            problems.append(
                Problem(
                    f"spec.softLimitDowngrades[{index}].to",
                    f"{downgrade.to_model!r} speaks {target.provider.value} but "
                    f"{downgrade.from_model!r} speaks {source.provider.value}",
                )
            )
    return problems


def team_budget_problems(
    spec: TeamBudgetSpec,
    *,
    namespace: str,
    policies: Mapping[str, RoutingPolicySpec | None],
) -> list[Problem]:
    """What the API server's schema cannot check in a TeamBudget.

    ``policies`` maps ``namespace/name`` of every known RoutingPolicy to its parsed spec,
    or to None when that policy exists but is itself invalid.
    """
    problems: list[Problem] = []
    if not is_valid_time_zone(spec.period.time_zone):
        problems.append(
            Problem(
                "spec.period.timeZone",
                f"{spec.period.time_zone!r} is not an IANA time zone (e.g. Europe/Berlin, UTC)",
            )
        )
    ref = spec.routing_policy_ref
    if ref is None:
        return problems
    policy_id = f"{ref.namespace or namespace}/{ref.name}"
    if policy_id not in policies:
        problems.append(
            Problem(
                "spec.routingPolicyRef",
                f"RoutingPolicy {policy_id} does not exist",
                Reason.ROUTING_POLICY_NOT_FOUND,
            )
        )
        return problems
    policy = policies[policy_id]
    if policy is None:
        problems.append(
            Problem(
                "spec.routingPolicyRef",
                f"RoutingPolicy {policy_id} is not Ready; see its conditions",
                Reason.ROUTING_POLICY_NOT_READY,
            )
        )
        return problems
    if ref.namespace not in (None, namespace) and not policy.grants_namespace(namespace):
        return problems  # not granted (policy.tenancy reports it): its models are not ours
    known = policy.model_names()
    for index, cap in enumerate(spec.model_caps):
        if cap.model not in known:
            problems.append(
                Problem(
                    f"spec.modelCaps[{index}].model",
                    f"model {cap.model!r} is not declared in RoutingPolicy {policy_id}",
                )
            )
    return problems


def policy_id_of(spec: TeamBudgetSpec, namespace: str) -> str | None:
    ref = spec.routing_policy_ref
    return None if ref is None else f"{ref.namespace or namespace}/{ref.name}"


__all__ = [
    "Problem",
    "parse_routing_policy_spec",
    "parse_team_budget_spec",
    "policy_id_of",
    "routing_policy_problems",
    "schema_problems",
    "team_budget_problems",
]
