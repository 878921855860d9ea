"""What a TeamBudget change does: caps, soft limit, period, enforcement, routing, the rest."""

from __future__ import annotations

from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.gitops.words import Change, field_changes, raised_or_lowered, show, usd

_WORDED = (
    "hardCapUSD",
    "softLimit",
    "period",
    "onHardCap",
    "routingPolicyRef",
    "loopDetection.action",
    "loopDetection.enabled",
)


def describe_budget(spec: TeamBudgetSpec, namespace: str) -> str:
    ref = spec.routing_policy_ref
    policy = f"{ref.namespace or namespace}/{ref.name}" if ref else "no RoutingPolicy"
    return (
        f"hard cap {usd(spec.hard_cap_usd)} per {spec.period.schedule.value.lower()} period "
        f"({spec.period.time_zone}), soft limit {usd(spec.soft_limit_usd())}, "
        f"at the cap: requests {spec.on_hard_cap.requests.value}, jobs "
        f"{spec.on_hard_cap.jobs.value}; routed by {policy}"
    )


def budget_changes(
    ref: str, old: TeamBudgetSpec, new: TeamBudgetSpec, old_ns: str, new_ns: str
) -> list[Change]:
    changes = []
    if old.hard_cap_usd != new.hard_cap_usd:
        changes.append(
            Change(
                ref,
                "hardCap",
                raised_or_lowered("hard cap", old.hard_cap_usd, new.hard_cap_usd),
                old.hard_cap_usd,
                new.hard_cap_usd,
            )
        )
    old_soft, new_soft = old.soft_limit_usd(), new.soft_limit_usd()
    if old_soft != new_soft:
        changes.append(
            Change(
                ref,
                "softLimit",
                raised_or_lowered("soft limit", old_soft, new_soft) + _soft_form(new),
                old_soft,
                new_soft,
            )
        )
    elif old.soft_limit != new.soft_limit:
        changes.append(
            Change(
                ref,
                "softLimit",
                f"soft limit unchanged at {usd(new_soft)} but now written"
                f" as {_soft_form(new).strip(' ()')}",
            )
        )
    changes += _period(ref, old, new)
    changes += _enforcement(ref, old, new)
    old_ref = _policy_of(old, old_ns)
    new_ref = _policy_of(new, new_ns)
    if old_ref != new_ref:
        changes.append(
            Change(ref, "routing", f"routed by {new_ref} instead of {old_ref}", old_ref, new_ref)
        )
    other = field_changes(old.to_wire(), new.to_wire(), _WORDED)
    if other:
        changes.append(Change(ref, "field", "other fields changed", details=other))
    return changes


def _soft_form(spec: TeamBudgetSpec) -> str:
    if spec.soft_limit.percent is not None:
        return f" ({spec.soft_limit.percent}% of the hard cap)"
    return " (a fixed amount)"


def _period(ref: str, old: TeamBudgetSpec, new: TeamBudgetSpec) -> list[Change]:
    changes = []
    if old.period.schedule != new.period.schedule:
        changes.append(
            Change(
                ref,
                "period",
                f"period changes from {old.period.schedule.value} to "
                f"{new.period.schedule.value}: the cap now applies per "
                f"{new.period.schedule.value.lower()} period",
                old.period.schedule.value,
                new.period.schedule.value,
            )
        )
    if old.period.time_zone != new.period.time_zone:
        changes.append(
            Change(
                ref,
                "period",
                f"periods start at midnight {new.period.time_zone} instead of "
                f"{old.period.time_zone}",
                old.period.time_zone,
                new.period.time_zone,
            )
        )
    return changes


def _enforcement(ref: str, old: TeamBudgetSpec, new: TeamBudgetSpec) -> list[Change]:
    before, after = old.on_hard_cap.to_wire(), new.on_hard_cap.to_wire()
    wording = {
        "requests": "new calls over the hard cap",
        "jobs": "running agent Jobs at the hard cap",
        "deletePropagation": "deletion propagation at the hard cap",
    }
    changes = []
    for key, what in wording.items():
        if before.get(key) != after.get(key):
            changes.append(
                Change(
                    ref,
                    "enforcement",
                    f"{what}: {show(before.get(key))} → {show(after.get(key))}",
                    before.get(key),
                    after.get(key),
                )
            )
    old_loop, new_loop = old.loop_detection, new.loop_detection
    if old_loop.action != new_loop.action or old_loop.enabled != new_loop.enabled:
        changes.append(
            Change(
                ref,
                "enforcement",
                "looping jobs: "
                f"{_loop(old_loop.enabled, old_loop.action.value)} → "
                f"{_loop(new_loop.enabled, new_loop.action.value)}",
                old_loop.action.value,
                new_loop.action.value,
            )
        )
    return changes


def _loop(enabled: bool, action: str) -> str:
    return action if enabled else "not detected"


def _policy_of(spec: TeamBudgetSpec, namespace: str) -> str:
    ref = spec.routing_policy_ref
    return f"{ref.namespace or namespace}/{ref.name}" if ref else "no RoutingPolicy"
