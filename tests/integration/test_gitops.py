"""One rule set, proven: what `costwarden validate` reports offline is what the API server
refuses (test_crds.py) or, for mistakes the schema cannot see, what the operator writes
into the object's Ready condition, with the same field path and message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from kubernetes import client

from costwarden.cluster import LocalControlPlane
from tests.support.invalid_sets import BrokenSet, broken_sets
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

GROUP, VERSION = "costwarden.io", "v1alpha1"
PLURALS = {"TeamBudget": "teambudgets", "RoutingPolicy": "routingpolicies"}
FLAGGED = [s for s in broken_sets() if s.operator_reason != "none"]


def _validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "costwarden", "validate", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _apply_set(control_plane: LocalControlPlane, namespace: str, case: BrokenSet) -> None:
    """Apply the set: objects without a namespace into the test's, the others (Namespaces,
    a policy in another team's namespace) as written, those first."""
    documents = [d for d in yaml.safe_load_all(case.path.read_text()) if d]
    placed = [d for d in documents if d["kind"] == "Namespace" or d["metadata"].get("namespace")]
    local = [d for d in documents if d not in placed]
    if placed:
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(placed))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(local))


@pytest.mark.parametrize("case", FLAGGED, ids=lambda c: c.id)
def test_operator_flags_what_validate_reports_with_the_same_field(
    control_plane: LocalControlPlane,
    operator: OperatorProcess,
    api_client: client.ApiClient,
    namespace: str,
    case: BrokenSet,
):
    offline = _validate("--output", "json", "--namespace", namespace, str(case.path))
    assert offline.returncode == 1, offline.stdout
    [problem] = json.loads(offline.stdout)["problems"]
    expected = f"{problem['field']}: {problem['message']}"
    assert problem["field"] == case.field

    # The API server's schema and CEL rules cannot see this mistake: the set is accepted...
    _apply_set(control_plane, namespace, case)
    custom = client.CustomObjectsApi(api_client)

    def ready_condition() -> dict | None:
        obj = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURALS[case.kind], case.name
        )
        conditions = (obj.get("status") or {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), None)

    # ... and the operator reports it in the object's Ready condition, in the same words.
    condition = wait_for(
        lambda: (c := ready_condition()) and c["status"] == "False" and c,
        what=f"{case.kind} {case.name} Ready=False",
    )
    assert condition["reason"] == case.operator_reason
    assert expected in condition["message"], (expected, condition["message"])
