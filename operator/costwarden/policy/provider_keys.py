"""Provider keys: which Secret keys the gateways need, where they find them, what is missing.

Pure decisions, no I/O (docs/install-helm.md, "Provider keys"):

- **Shared gateway.** The operator mirrors every key a RoutingPolicy in the gateway
  configuration references (always a Secret in the policy's own namespace) into one Secret
  it owns in its own namespace, ``<fullname>-provider-keys``. Each key becomes the data key
  :func:`mirrored_key` (``<namespace>_<secret>_<key>``), which is also the file name the
  gateway reads from its mount of that Secret: one function, used by both sides.
  :func:`plan_mirror` decides the mirrored data and, per policy, the problems to report
  in its Ready condition (the Secret is missing, lacks the key, or the operator may not
  read it), naming ``spec.models[i].credentials``.
- **Sidecars.** A sidecar gets keys only from Secrets in its pod's own namespace, as
  ``secretKeyRef`` env (:func:`sidecar_credentials`); a key held elsewhere is never copied
  into a tenant namespace.

The operator compares and copies Secret data as the API serves it (base64) and never
decodes a key; nothing here logs or formats a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from costwarden.api.conditions import Reason
from costwarden.api.gatewayconfig import CredentialRef, GatewayConfig
from costwarden.policy.render import PolicyVerdict
from costwarden.policy.validation import Problem

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")
MAX_DATA_KEY = 253
"""Kubernetes' limit on a Secret data key (and a file name in the mounted volume)."""


def mirrored_key(ref: CredentialRef) -> str:
    """The data key of ``ref`` in the mirrored Secret, and the gateway's file name for it.

    Injective: namespaces and Secret names are DNS names (no ``_``), so the first two
    ``_`` separate the parts; the Secret key itself may contain ``_``."""
    return f"{ref.namespace}_{ref.name}_{ref.key}"


def credential_env_name(ref: CredentialRef) -> str:
    """The sidecar's environment variable for ``ref``, set by the injector from a
    ``secretKeyRef`` and read by the gateway: ``COSTWARDEN_CREDENTIAL_<NS>_<NAME>_<KEY>``
    (upper case, every character other than a letter or digit as ``_``)."""
    parts = (ref.namespace, ref.name, ref.key)
    return "COSTWARDEN_CREDENTIAL_" + "_".join(_NOT_ALNUM.sub("_", p).upper() for p in parts)


def credential_env(refs: Sequence[CredentialRef]) -> list[dict[str, Any]]:
    """``env`` entries giving a sidecar the keys of ``refs`` (Secrets in its namespace).
    Optional: a pod whose Secret is missing still starts, and the sidecar refuses the
    keyless model's calls with a message naming the Secret."""
    return [
        {
            "name": credential_env_name(ref),
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": True}},
        }
        for ref in refs
    ]


def secret_reference(ref: CredentialRef) -> str:
    """How messages name a key: ``Secret <namespace>/<name> key <key>`` (never its value)."""
    return f"Secret {ref.namespace}/{ref.name} key {ref.key!r}"


class Access(StrEnum):
    """What reading one Secret gave the operator."""

    FOUND = "Found"
    NOT_FOUND = "NotFound"
    FORBIDDEN = "Forbidden"
    """The operator's RBAC does not allow reading Secrets in that namespace."""
    ERROR = "Error"
    """Any other failure (API server unavailable): keep what is mirrored, report nothing."""


@dataclass(frozen=True)
class SecretRead:
    access: Access
    data: Mapping[str, str] = field(default_factory=dict)
    """The Secret's ``data`` as served (base64 strings), only when ``FOUND``."""


@dataclass(frozen=True)
class Reference:
    """One model's credentials in one policy of the configuration."""

    policy_id: str
    index: int
    """Position of the model in ``spec.models`` (the configuration keeps the order)."""
    model: str
    ref: CredentialRef


@dataclass(frozen=True)
class MirrorPlan:
    data: dict[str, str]
    """The mirrored Secret's data: ``mirrored_key(ref)`` → base64 value as read."""
    problems: dict[str, tuple[Problem, ...]]
    """Per policy id, the credentials that cannot be served, in model order."""


def references(config: GatewayConfig) -> list[Reference]:
    """Every model with credentials in the configuration, in policy and model order."""
    return [
        Reference(policy.id, index, model.name, model.credentials)
        for policy in config.policies
        for index, model in enumerate(policy.models)
        if model.credentials is not None
    ]


def secrets_to_read(config: GatewayConfig) -> list[tuple[str, str]]:
    """``(namespace, name)`` of each Secret the configuration references, once, sorted."""
    return sorted({(r.ref.namespace, r.ref.name) for r in references(config)})


def plan_mirror(
    config: GatewayConfig,
    reads: Mapping[tuple[str, str], SecretRead],
    current: Mapping[str, str] | None = None,
    *,
    allowed_hint: str = "",
) -> MirrorPlan:
    """The mirrored data and the problems, from what reading each Secret gave.

    ``current`` is the mirrored Secret's data now: a key whose Secret could not be read
    for a transient reason (``ERROR``) keeps its mirrored value rather than vanishing.
    Keys no longer referenced are left out, so rotation and removal both propagate.
    ``allowed_hint`` tells the admin how to let the operator read a forbidden namespace.
    """
    data: dict[str, str] = {}
    problems: dict[str, list[Problem]] = {}
    for reference in references(config):
        ref, name = reference.ref, mirrored_key(reference.ref)
        read = reads.get((ref.namespace, ref.name), SecretRead(Access.ERROR))
        problem: Problem | None = None
        where = f"spec.models[{reference.index}].credentials"
        what = f"model {reference.model!r} needs {secret_reference(ref)}"
        if len(name) > MAX_DATA_KEY:
            problem = Problem(
                where,
                f"{what}, but namespace, Secret name and key together exceed {MAX_DATA_KEY} "
                "characters and cannot be mirrored for the shared gateway; use a shorter name",
                Reason.CREDENTIALS_NOT_FOUND,
            )
        elif read.access is Access.FOUND:
            value = read.data.get(ref.key)
            if value:
                data[name] = value
            else:
                state = "has no key" if value is None else "has an empty value for key"
                problem = Problem(
                    where,
                    f"{what}; Secret {ref.namespace}/{ref.name} {state} {ref.key!r}",
                    Reason.CREDENTIALS_NOT_FOUND,
                )
        elif read.access is Access.NOT_FOUND:
            problem = Problem(
                where,
                f"{what}; Secret {ref.namespace}/{ref.name} does not exist",
                Reason.CREDENTIALS_NOT_FOUND,
            )
        elif read.access is Access.FORBIDDEN:
            problem = Problem(
                where,
                f"{what}; the operator is not allowed to read Secrets in namespace "
                f"{ref.namespace}{allowed_hint}",
                Reason.CREDENTIALS_NOT_READABLE,
            )
        elif current and name in current:
            data[name] = current[name]
        if problem is not None:
            problems.setdefault(reference.policy_id, []).append(problem)
    return MirrorPlan(
        dict(sorted(data.items())), {pid: tuple(found) for pid, found in problems.items()}
    )


def sidecar_credentials(
    config: GatewayConfig, namespace: str, labels: Mapping[str, str]
) -> list[CredentialRef]:
    """The keys an injected sidecar may get: its team's policy's references to Secrets in
    the pod's own namespace (a pod can reference those itself anyway). A key held in
    another namespace is never handed to a tenant's pod; calls needing it are refused by
    the sidecar (use the shared gateway, or a team-owned Secret)."""
    team = config.team_for_workload(namespace, dict(labels))
    policy = config.policy(team.routing_policy) if team is not None else None
    if policy is None:
        return []
    refs = {
        (m.credentials.namespace, m.credentials.name, m.credentials.key): m.credentials
        for m in policy.models
        if m.credentials is not None and m.credentials.namespace == namespace
    }
    return [refs[k] for k in sorted(refs)]


def with_credential_problems(
    verdicts: Mapping[str, PolicyVerdict], problems: Mapping[str, tuple[Problem, ...]]
) -> dict[str, PolicyVerdict]:
    """The policies' verdicts with Ready=False where a model's key cannot be served.

    Such a policy stays in the gateway configuration: its other models keep working and
    the gateway refuses the keyless model's calls itself (503 ``missing_credentials``), so
    the budgets that use it stay Ready."""
    result = dict(verdicts)
    for policy_id, found in problems.items():
        verdict = result.get(policy_id)
        if verdict is None or not verdict.ready or not found:
            continue
        message = "; ".join(str(p) for p in found) + (
            ". The gateway refuses calls to these models until the key is there"
        )
        result[policy_id] = PolicyVerdict(
            False, found[0].reason, message, found, verdict.models, verdict.teams
        )
    return result
