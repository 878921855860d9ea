"""Injected sidecars report usage with a token bound to their pod: the operator counts a
sidecar's own usage and refuses anything else it claims (nobody spends another's budget)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from costwarden.accounting.batch import BatchItem, UsageBatch
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import SIDECAR_REPORT_AUDIENCE, Endpoint, Outcome, UsageRecord
from costwarden.cluster import LocalControlPlane
from costwarden.testing.processes import free_port
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

POD = "agent-pod"


@pytest.fixture
def ingest_url(
    control_plane: LocalControlPlane, crds, api_client: client.ApiClient, tmp_path: Path
) -> Iterator[str]:
    home = f"cw-sidecars-{free_port()}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    port = free_port()
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), home, tmp_path / "operator.log",
        "--standalone", "--ingest-port", str(port), "--ingest-listen-address", "127.0.0.1",
        "--ingest-allow-sidecars", "--ingest-cert-dir", str(tmp_path / "ingest-tls"),
    ).start()  # fmt: skip
    ca = tmp_path / "ingest-tls" / "ca.crt"
    wait_for(ca.exists, timeout=60, what="the ingestion certificate")
    process.wait_http_ok(f"https://127.0.0.1:{port}/healthz", timeout=60, context=_tls(ca))
    TLS["context"] = _tls(ca)
    yield f"https://127.0.0.1:{port}/v1/usage"
    process.stop()
    core.delete_namespace(home)


@pytest.fixture
def agent(control_plane: LocalControlPlane, api_client: client.ApiClient, namespace: str) -> str:
    """A budget, a service account and a pod running as it (Pending: no kubelet)."""
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=POD),
            spec=client.V1PodSpec(
                service_account_name="agent",
                containers=[client.V1Container(name="agent", image="busybox:1.36")],
            ),
        ),
    )
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
         "metadata": {"name": "team"}, "spec": {"hardCapUSD": 5}},
    )  # fmt: skip
    return namespace


def _token(control_plane: LocalControlPlane, namespace: str, *bound: str) -> str:
    return control_plane.kubectl(
        "create", "token", "agent", "-n", namespace, "--audience", SIDECAR_REPORT_AUDIENCE, *bound
    ).stdout.strip()


def _batch(namespace: str, pod: str, cost: str, seq: int = 1) -> dict[str, Any]:
    record = UsageRecord(
        time=datetime.now(UTC), team=f"{namespace}/team", namespace=namespace, pod=pod,
        caller="sidecar", endpoint=Endpoint.CHAT_COMPLETIONS, served_model="m",
        usage_reported=True, tokens=TokenUsage(input=10), cost_usd=Decimal(cost),
        outcome=Outcome.OK,
    )  # fmt: skip
    batch = UsageBatch(source=f"{namespace}/{pod}", items=[BatchItem(seq=seq, record=record)])
    return batch.to_wire()


TLS: dict[str, ssl.SSLContext] = {}


def _tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _post(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10, context=TLS["context"]) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _spent(api_client: client.ApiClient, namespace: str) -> str:
    budget = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", "team"
    )
    return str((budget.get("status") or {}).get("spentUSD", ""))


def test_a_sidecar_reports_its_own_pods_usage_and_nothing_else(
    control_plane: LocalControlPlane, api_client, ingest_url: str, agent: str
):
    bound = _token(control_plane, agent, "--bound-object-kind", "Pod",
                   "--bound-object-name", POD)  # fmt: skip
    wait_for(lambda: _spent(api_client, agent) != "", timeout=60, what="the budget reconciled")

    status, ack = wait_for(
        lambda: (r := _post(ingest_url, bound, _batch(agent, POD, "0.25")))[0] == 200 and r,
        timeout=60, what="the sidecar's own usage accepted",
    )  # fmt: skip
    assert ack["ackedSeq"] == 1
    wait_for(lambda: _spent(api_client, agent) == "0.25", timeout=30, what="spend counted")

    status, error = _post(ingest_url, bound, _batch(agent, "someone-else", "3.00", seq=2))
    assert status == 403
    assert f"{agent}/{POD} only" in json.dumps(error)

    unbound = _token(control_plane, agent)  # right audience, but bound to no pod
    status, _ = _post(ingest_url, unbound, _batch(agent, POD, "3.00", seq=3))
    assert status == 403
    assert _spent(api_client, agent) == "0.25"  # nothing refused was counted
