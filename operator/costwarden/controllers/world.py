"""The operator's view of the cluster: every TeamBudget and RoutingPolicy it has observed.

Kopf's watch events keep it current; the reconciler reads a snapshot. Budgets and policies
are few (hundreds to thousands) and small, so holding them all is cheap; agent Jobs, which
are many, are never kept here (enforcement asks the API server for them by label).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from costwarden.policy.render import ObservedObject
from costwarden.policy.tenancy import consent_of, consents_from_namespaces


def observe(body: Mapping[str, Any]) -> ObservedObject:
    meta = body.get("metadata", {})
    return ObservedObject(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        generation=int(meta.get("generation") or 0),
        spec=dict(body.get("spec") or {}),
        status=dict(body.get("status") or {}),
        uid=str(meta.get("uid", "")),
    )


def resource_version(body: Mapping[str, Any]) -> str:
    return str(body.get("metadata", {}).get("resourceVersion", ""))


@dataclass
class ObservedWorld:
    """Objects by kind and id, plus a signal that something changed.

    ``consents`` holds, for each Namespace carrying the ``costwarden.io/budget``
    annotation, the budget it consents to (policy.tenancy); it is replaced, never mutated,
    so readers holding the old mapping see a consistent one.
    """

    budgets: dict[str, ObservedObject] = field(default_factory=dict)
    policies: dict[str, ObservedObject] = field(default_factory=dict)
    consents: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def apply(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Record a watch event (``None`` is Kopf's initial listing) and wake the reconciler."""
        if kind == "namespace":
            self.apply_namespace(event_type, body)
            return
        store = self.budgets if kind == "budget" else self.policies
        observed = observe(body)
        key = f"{kind}:{observed.id}"
        if event_type == "DELETED":
            store.pop(observed.id, None)
            self.versions.pop(key, None)
        else:
            store[observed.id] = observed
            self.versions[key] = resource_version(body)
        self.changed.set()

    def apply_namespace(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Namespace event: wake the reconciler only when its consent changed."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name", ""))
        consent = None if event_type == "DELETED" else consent_of(meta.get("annotations"))
        if self.consents.get(name) == consent:
            return
        consents = dict(self.consents)
        if consent is None:
            consents.pop(name, None)
        else:
            consents[name] = consent
        self.consents = consents
        self.changed.set()

    def replace(
        self,
        budgets: Sequence[Mapping[str, Any]],
        policies: Sequence[Mapping[str, Any]],
        namespaces: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Replace everything with a fresh LIST (start-up, and resyncs against missed events)."""
        if namespaces is not None:
            self.consents = consents_from_namespaces(namespaces)
        self.budgets = {o.id: o for o in map(observe, budgets)}
        self.policies = {o.id: o for o in map(observe, policies)}
        self.versions = {
            **{f"budget:{observe(b).id}": resource_version(b) for b in budgets},
            **{f"policy:{observe(p).id}": resource_version(p) for p in policies},
        }
        self.changed.set()

    def version_of(self, kind: str, object_id: str) -> str:
        return self.versions.get(f"{kind}:{object_id}", "")
