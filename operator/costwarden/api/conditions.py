"""Condition types and reasons of both kinds, and the one way to update a condition list.

As in Kueue's ``workload_types.go``, each type and reason is a named constant documented
with when it applies, so handlers, tests and docs use the same words.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from costwarden.api.meta import Condition, ConditionStatus


class ConditionType(StrEnum):
    READY = "Ready"
    """The object is valid, its references resolve, and the gateway configuration includes it."""
    SOFT_LIMIT_REACHED = "SoftLimitReached"
    """TeamBudget only: spend in the period is at or past the soft limit."""
    HARD_CAP_REACHED = "HardCapReached"
    """TeamBudget only: spend (or a token cap) is at or past the hard cap; enforcement acts."""
    USAGE_APPLIED = "UsageApplied"
    """TeamBudget only, set once the team's usage was first held: False (UsageHeld) while
    usage entries from a gateway cannot be written to the status and are held (kept by the
    gateway, re-sent; spend in status lags), True (UsageApplied) once they applied."""


class Reason(StrEnum):
    RECONCILED = "Reconciled"
    """Ready=True: the object is in the gateway configuration as written."""
    INVALID_SPEC = "InvalidSpec"
    """Ready=False: a field is wrong in a way the API server schema cannot see."""
    ROUTING_POLICY_NOT_FOUND = "RoutingPolicyNotFound"
    """Ready=False: spec.routingPolicyRef names no RoutingPolicy."""
    ROUTING_POLICY_NOT_READY = "RoutingPolicyNotReady"
    """Ready=False: the referenced RoutingPolicy is itself invalid."""
    CREDENTIALS_NOT_FOUND = "CredentialsNotFound"
    """Ready=False (RoutingPolicy): a model's credentials Secret does not exist or lacks the
    key; the gateway refuses that model's calls until it does (docs/install-helm.md)."""
    CREDENTIALS_NOT_READABLE = "CredentialsNotReadable"
    """Ready=False (RoutingPolicy): the operator may not read Secrets in the policy's
    namespace; the cluster admin adds it to the chart's providerKeys.namespaces."""
    PROVIDER_HOST_NOT_ALLOWED = "ProviderHostNotAllowed"
    """Ready=False: an External model's endpoint is not one of the admin's provider hosts."""
    NAMESPACE_NOT_GRANTED = "NamespaceNotGranted"
    """Ready=False: spec.workloads.namespaces claims a namespace whose Namespace object does
    not consent (annotation ``costwarden.io/budget``); the budget governs only its own
    namespace and the consenting ones."""
    REFERENCE_NOT_GRANTED = "ReferenceNotGranted"
    """Ready=False: spec.routingPolicyRef names a RoutingPolicy in another namespace that
    does not grant the budget's namespace (spec.grants.namespaces); calls are refused."""
    NO_ROUTING_POLICY = "NoRoutingPolicy"
    """Ready=True, but the team has no RoutingPolicy: every call will be refused."""
    WITHIN_LIMIT = "WithinLimit"
    """SoftLimitReached/HardCapReached=False: spend is below the threshold."""
    SOFT_LIMIT_EXCEEDED = "SoftLimitExceeded"
    USAGE_HELD = "UsageHeld"
    """UsageApplied=False: the team's usage is held (docs/operations.md)."""
    USAGE_APPLIED = "UsageApplied"
    """UsageApplied=True: the usage once held has been applied."""
    HARD_CAP_EXCEEDED = "HardCapExceeded"
    TOKEN_CAP_EXCEEDED = "TokenCapExceeded"
    CALL_EXCEEDS_REMAINING = "CallExceedsRemaining"
    """HardCapReached=True before spend reaches the cap: a call was refused because even at
    the policy's default output ceiling its worst case does not fit what is left
    (status.leases.refusedNeedUSD); reserve-before-forward keeps spend itself below the cap."""


def set_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None,
) -> list[Condition]:
    """Return the list with one condition set, keeping lastTransitionTime if status holds.

    Kubernetes convention: lastTransitionTime moves only when status changes, so a reader
    sees how long a condition has held, not when the operator last looked.
    """
    previous = next((c for c in conditions if c.type == type), None)
    transition = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    others = [c for c in conditions if c.type != type]
    return sorted([*others, updated], key=lambda c: c.type)


def find_condition(conditions: list[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)
