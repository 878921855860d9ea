"""Kopf handlers: they feed the observed world and wake the reconciler, nothing more.

Handlers do not write status themselves: the reconciler is the single writer (see
``reconciler``), which keeps budgets and the policies they reference consistent. Kopf runs
these only in the active replica (peering), so standby replicas stay quiet.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from costwarden.api import routingpolicy, teambudget
from costwarden.api.meta import GROUP, VERSION
from costwarden.controllers.reconciler import Reconciler
from costwarden.supervision import Supervisor

log = logging.getLogger(__name__)


def _reconciler(memo: Any) -> Reconciler:
    reconciler: Reconciler = memo.reconciler
    return reconciler


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, the service account; elsewhere the kubeconfig (``--kubeconfig`` sets
    KUBECONFIG at start, after the client library has already read its default)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start_reconciler(memo: kopf.Memo, **_: Any) -> None:
    reconciler = _reconciler(memo)
    await reconciler.relist()
    supervisor: Supervisor = getattr(memo, "supervisor", None) or Supervisor("operator")
    memo.reconciler_task = supervisor.start("reconciler", reconciler.run_forever)
    log.info("reconciler started")


@kopf.on.probe(id="supervised_tasks", errors=kopf.ErrorsMode.PERMANENT)
def supervised_tasks(memo: kopf.Memo, **_: Any) -> list[str]:
    """Kopf's liveness endpoint (``--health-port``) fails (HTTP 500) once a supervised
    task has been failing longer than its bound; otherwise it lists the tasks failing
    right now (recovering within the bound)."""
    supervisor: Supervisor | None = getattr(memo, "supervisor", None)
    if supervisor is None:
        return []
    problems = supervisor.problems()
    if problems:
        raise kopf.PermanentError("; ".join(problems))
    return supervisor.failing()


@kopf.on.cleanup()
async def stop_reconciler(memo: kopf.Memo, **_: Any) -> None:
    task: asyncio.Task[None] | None = getattr(memo, "reconciler_task", None)
    if task is not None:
        task.cancel()


@kopf.on.event(GROUP, VERSION, teambudget.PLURAL)
def budget_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).world.apply("budget", event.get("type"), event["object"])


@kopf.on.event("", "v1", "namespaces")
def namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Namespaces carry the cluster admin's consent (annotation costwarden.io/budget) that
    lets a budget elsewhere govern them; only a change of it wakes the reconciler."""
    _reconciler(memo).world.apply("namespace", event.get("type"), event["object"])


@kopf.on.event(GROUP, VERSION, routingpolicy.PLURAL)
def policy_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).world.apply("policy", event.get("type"), event["object"])
