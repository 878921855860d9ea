"""One team whose books the API server refuses to write never holds back another team's
usage from the same gateway, and loses nothing: on the real control plane, a
ValidatingAdmissionPolicy refuses status writes carrying spend for one TeamBudget (as the
API server refuses a value outside the schema: a permanent error, 422). Both teams call
through one gateway; the other team's spend keeps up with its calls meanwhile; once the
policy is removed the held usage applies, and the totals equal the upstream's bill."""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from typing import Any

from kubernetes import client

from tests.e2e.test_restarts import Agent
from tests.support.polling import wait_for
from tests.support.stack import GROUP, VERSION, Stack, job_manifest, upstream_cost

POLICY = "costwarden-test-poison-status"
VAP = f"""
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {POLICY}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [{GROUP}]
      apiVersions: ["*"]
      operations: [UPDATE]
      resources: [teambudgets/status]
  validations:
  - expression: >-
      object.metadata.name != 'poisoned' || !has(object.status) ||
      !has(object.status.spentExactUSD) || object.status.spentExactUSD == '0'
    message: this TeamBudget's spend may not be written (test)
    reason: Invalid
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {POLICY}}}
spec:
  policyName: {POLICY}
  validationActions: [Deny]
"""


def spent(stack: Stack, namespace: str, name: str) -> Decimal:
    return Decimal(stack.status(namespace, name).get("spentExactUSD") or 0)


def ledger_cost(stack: Stack, team: str) -> Decimal:
    """What the gateway metered for ``team`` (its ledger: every billed call, once)."""
    total = Decimal(0)
    for line in stack.gateway.ledger.read_bytes().splitlines():
        record: dict[str, Any] = json.loads(line) if line.startswith(b'{"apiV') else {}
        if record.get("team") == team and record.get("usageReported"):
            total += Decimal(record["costUSD"])
    return total


def usage_applied(stack: Stack, namespace: str, name: str) -> dict[str, Any] | None:
    conditions = stack.status(namespace, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "UsageApplied"), None)


def policy_active(stack: Stack, namespace: str) -> bool:
    """A dry-run status write with spend is refused (the policy is in force)."""
    body = {"status": {"spentExactUSD": "1"}}
    try:
        stack.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "teambudgets", "poisoned", body, dry_run="All"
        )
    except client.ApiException as error:
        return error.status in (400, 403, 422)
    return False


def test_one_teams_permanent_error_does_not_block_another_teams_usage(
    stack: Stack, namespace: str
) -> None:
    other = f"poison-{secrets.token_hex(3)}"
    stack.plane.kubectl("create", "namespace", other)
    try:
        healthy = stack.team(namespace, "healthy", "100")
        poisoned = stack.team(other, "poisoned", "100")
        stack.plane.kubectl("apply", "-f", "-", input=VAP)
        wait_for(lambda: policy_active(stack, other), timeout=60, what="the policy in force")
        stack.create(namespace, job_manifest("agent", "healthy"))
        stack.create(other, job_manifest("agent", "poisoned"))
        agents = [
            Agent(stack.gateway.agent(healthy, namespace, "agent")),
            Agent(stack.gateway.agent(poisoned, other, "agent")),
        ]
        for agent in agents:
            agent.start()
        wait_for(lambda: all(a.answered >= 60 for a in agents), timeout=60, what="calls")
        for agent in agents:
            agent.stop.set()
            agent.join(10)

        # The healthy team's spend equals what it was metered, although every batch from
        # this gateway also carried the poisoned team's entries.
        wait_for(
            lambda: spent(stack, namespace, "healthy") == ledger_cost(stack, healthy) > 0,
            timeout=30, what="the healthy team's spend applied",
        )  # fmt: skip
        assert spent(stack, other, "poisoned") == 0
        events = client.CoreV1Api(stack.api_client).list_namespaced_event(other).items
        assert any(e.reason == "UsageHeld" for e in events), [e.reason for e in events]
        # ... and a condition says it while it lasts (kubectl get -o wide, describe).
        held = wait_for(lambda: usage_applied(stack, other, "poisoned"), timeout=30,
                        what="UsageApplied on the poisoned budget")  # fmt: skip
        assert (held["status"], held["reason"]) == ("False", "UsageHeld"), held
        assert "usage entries from a gateway" in held["message"], held
        assert usage_applied(stack, namespace, "healthy") is None  # never held: no condition

        # The cause fixed: the held usage applies (kept by the gateway), nothing lost.
        stack.plane.kubectl("delete", "-f", "-", input=VAP)
        wait_for(
            lambda: spent(stack, other, "poisoned") == ledger_cost(stack, poisoned) > 0,
            timeout=120, what="the held usage applied once the cause is fixed",
        )  # fmt: skip
        assert spent(stack, namespace, "healthy") + spent(stack, other, "poisoned") == (
            upstream_cost(stack.upstream)
        )
        wait_for(
            lambda: (usage_applied(stack, other, "poisoned") or {}).get("status") == "True",
            timeout=60, what="UsageApplied=True once the held usage applied",
        )  # fmt: skip
        assert usage_applied(stack, other, "poisoned")["reason"] == "UsageApplied"  # type: ignore[index]
    finally:
        stack.plane.kubectl("delete", "-f", "-", "--ignore-not-found", input=VAP, check=False)
        stack.plane.kubectl("delete", "namespace", other, "--wait=false", check=False)
