"""The CRDs on a real API server: install, accept the examples, refuse every broken
manifest with a message naming the field, default like the models, and print readable
columns."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml
from kubernetes import client

from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.cluster import LocalControlPlane
from tests.support.manifests import EXAMPLES_DIR, BrokenManifest, broken_manifests

CASES = broken_manifests()


@pytest.fixture(scope="module")
def examples_applied(control_plane: LocalControlPlane, crds: list[str]) -> None:
    control_plane.kubectl("apply", "-f", str(EXAMPLES_DIR))


def test_examples_apply_and_kubectl_get_costwarden_lists_both_kinds(
    control_plane: LocalControlPlane, examples_applied: None
):
    out = control_plane.kubectl("get", "costwarden", "-A").stdout
    header_lines = [line for line in out.splitlines() if line.startswith("NAMESPACE")]
    assert any(
        line.split() == ["NAMESPACE", "NAME", "SPENT", "LIMIT", "USED", "PHASE", "AGE"]
        for line in header_lines
    ), out
    assert any(
        line.split() == ["NAMESPACE", "NAME", "DEFAULT", "MODELS", "TEAMS", "READY", "AGE"]
        for line in header_lines
    ), out
    assert "teambudget.costwarden.io/payments" in out
    assert "teambudget.costwarden.io/support" in out
    assert "routingpolicy.costwarden.io/standard" in out
    rows = control_plane.kubectl("get", "tb", "-n", "team-payments").stdout.splitlines()
    assert rows[1].split()[:3] == ["payments", "<none>", "500"] or "500" in rows[1], rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_server_refuses_each_broken_manifest_naming_the_field(
    control_plane: LocalControlPlane, crds: list[str], namespace: str, case: BrokenManifest
):
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(case.document), check=False
    )
    assert result.returncode != 0, f"{case.id} was accepted:\n{result.stdout}"
    assert case.field in result.stderr, result.stderr
    assert case.message in result.stderr, result.stderr
    # Nothing was created: a refused manifest changes nothing.
    kind = "teambudgets" if case.kind == "TeamBudget" else "routingpolicies"
    listed = control_plane.kubectl("get", kind, "-n", namespace, "-o", "name").stdout
    assert listed.strip() == ""


def test_api_server_defaults_match_the_models(api_client: client.ApiClient, crds, namespace):
    minimal = {"hardCapUSD": "20"}
    api = client.CustomObjectsApi(api_client)
    created = api.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
         "metadata": {"name": "defaults"}, "spec": minimal},
    )  # fmt: skip
    expected = TeamBudgetSpec.model_validate(minimal).to_wire()
    expected["hardCapUSD"] = "20"  # the server keeps the wire form; the model normalizes it
    server = created["spec"]
    # Empty lists are omitted by the server and emitted by the model; compare what is set.
    assert _without_empty_lists(expected) == server


def _without_empty_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):  # items of a list default too (spec.attribution.keys)
        return [_without_empty_lists(v) for v in value]
    return value


def test_kubectl_explain_teaches_the_api(control_plane: LocalControlPlane, crds):
    out = control_plane.kubectl("explain", "teambudget.spec.onHardCap.jobs").stdout
    assert "Suspend sets spec.suspend on running agent Jobs" in out
    out = control_plane.kubectl("explain", "routingpolicy.spec.rules").stdout
    assert "first that matches a call decides its model" in out


def test_status_is_a_subresource(api_client: client.ApiClient, crds, namespace):
    api = client.CustomObjectsApi(api_client)
    api.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
         "metadata": {"name": "sub"}, "spec": {"hardCapUSD": 5},
         "status": {"phase": "Exhausted"}},
    )  # fmt: skip
    got = api.get_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", "sub"
    )
    # Writes to the main resource cannot set status: only the operator, via /status, can.
    assert "status" not in got or got["status"].get("phase") is None


def test_per_call_tool_prices_are_accepted_and_kept_exact(
    api_client: client.ApiClient, crds, namespace
):
    """toolCallUSD (a map of decimal strings) passes the API server's schema (an OpenAPI
    pattern, not a CEL rule per value: the CRD's CEL cost budget would not allow one)."""
    from costwarden.api.routingpolicy import RoutingPolicySpec

    spec = {
        "models": [
            {
                "name": "gpt",
                "provider": "OpenAI",
                "endpoint": "https://api.openai.com/v1",
                "upstreamModel": "gpt-4o",
                "pricing": {
                    "inputPerMTokUSD": "2.50",
                    "outputPerMTokUSD": "10",
                    "toolCallUSD": {"web_search_call": "0.01", "file_search_call": "0.0025"},
                },
            }
        ],
        "defaultModel": "gpt",
    }
    api = client.CustomObjectsApi(api_client)
    created = api.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "routingpolicies",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "RoutingPolicy",
         "metadata": {"name": "tool-prices"}, "spec": spec},
    )  # fmt: skip

    pricing = RoutingPolicySpec.model_validate(created["spec"]).models[0].pricing
    assert pricing is not None
    assert pricing.tool_call_usd == {
        "web_search_call": Decimal("0.01"),
        "file_search_call": Decimal("0.0025"),
    }
