"""The gateway configuration the operator would publish for a set of manifests.

It is the operator's own decision (``policy.render.reconcile``) applied to the objects in
the manifests, as if they were the whole cluster: a reviewer sees exactly which teams,
models, prices and rules the gateways would enforce. The spend state is zero (or what a
manifest's ``status`` says) and the period is the one holding ``now``, which ``--now``
fixes so that the output is reproducible. Namespace manifests in the set supply the
consents (``costwarden.io/budget`` annotations) that let a budget govern other namespaces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from costwarden.api import teambudget
from costwarden.api.catalog import PriceCatalog
from costwarden.gitops.loader import Document
from costwarden.gitops.objects import (
    DEFAULT_NAMESPACE,
    envelope_problems,
    namespace_manifests,
    read_objects,
)
from costwarden.policy.render import Reconciliation, reconcile, serialize
from costwarden.policy.tenancy import consents_from_namespaces


def reconcile_documents(
    documents: Sequence[Document],
    *,
    catalog: PriceCatalog,
    now: datetime,
    default_namespace: str = DEFAULT_NAMESPACE,
) -> Reconciliation:
    """What the operator decides for these objects (envelope-broken ones are left out,
    as the API server would never have stored them)."""
    objects = [o for o in read_objects(documents, default_namespace) if not envelope_problems(o)]
    budgets = [o.observed() for o in objects if o.kind == teambudget.KIND]
    policies = [o.observed() for o in objects if o.kind != teambudget.KIND]
    consents = consents_from_namespaces(namespace_manifests(documents))
    return reconcile(budgets, policies, catalog, now, consents=consents)


def pretty(result: Reconciliation) -> str:
    """The published document, indented with sorted keys: stable, so it diffs cleanly."""
    return json.dumps(json.loads(serialize(result.config)), indent=2, sort_keys=True) + "\n"


def left_out(result: Reconciliation) -> list[str]:
    """One line per object the operator would leave out of the configuration, and why."""
    lines = [
        f"TeamBudget {oid}: {v.reason}: {v.message}"
        for oid, v in sorted(result.budgets.items())
        if not v.ready
    ]
    lines += [
        f"RoutingPolicy {oid}: {v.reason}: {v.message}"
        for oid, v in sorted(result.policies.items())
        if not v.ready
    ]
    return lines
