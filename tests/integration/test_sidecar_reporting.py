"""Injected sidecars report usage with a token bound to their pod: the operator counts a
sidecar's own usage and refuses anything else it claims (nobody spends another's budget)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from kubernetes import client

from costwarden.accounting.batch import BatchItem, UsageBatch
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import SIDECAR_REPORT_AUDIENCE, Endpoint, Outcome, UsageRecord
from costwarden.cluster import LocalControlPlane
from costwarden.testing.processes import free_port
from costwarden.testing.threads import ServerThread
from costwarden.testing.upstream import FakeUpstream
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for
from tests.support.stack import ConfigMirror

POD = "agent-pod"


@pytest.fixture
def ingest(
    control_plane: LocalControlPlane, crds, api_client: client.ApiClient, tmp_path: Path
) -> Iterator[tuple[str, str, Path]]:
    """The operator's ingestion URL (HTTPS), the namespace it publishes its configuration
    in, and the CA bundle its ingestion certificate is signed by."""
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
    yield f"https://127.0.0.1:{port}/v1/usage", home, ca
    process.stop()
    core.delete_namespace(home)


@pytest.fixture
def ingest_url(ingest: tuple[str, str, Path]) -> str:
    return ingest[0]


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
    custom = client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "routingpolicies",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "RoutingPolicy",
         "metadata": {"name": "routing"},
         "spec": {"models": [{"name": "m", "provider": "OpenAI",
                              "endpoint": "https://api.openai.com/v1",
                              "pricing": {"inputPerMTokUSD": "1", "outputPerMTokUSD": "2"}}],
                  "defaultModel": "m"}},
    )  # fmt: skip
    custom.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
         "metadata": {"name": "team"},
         "spec": {"hardCapUSD": 5, "routingPolicyRef": {"name": "routing"}}},
    )  # fmt: skip
    return namespace


def _token(control_plane: LocalControlPlane, namespace: str, *bound: str) -> str:
    return control_plane.kubectl(
        "create", "token", "agent", "-n", namespace, "--audience", SIDECAR_REPORT_AUDIENCE, *bound
    ).stdout.strip()


def _batch(namespace: str, pod: str, cost: str, seq: int = 1) -> dict[str, Any]:
    """A record of ``cost`` USD: input tokens at the policy's 1 USD per million."""
    record = UsageRecord(
        time=datetime.now(UTC), team=f"{namespace}/team", namespace=namespace, pod=pod,
        caller="sidecar", endpoint=Endpoint.CHAT_COMPLETIONS, served_model="m",
        usage_reported=True, tokens=TokenUsage(input=int(Decimal(cost) * 1_000_000)),
        cost_usd=Decimal(cost), outcome=Outcome.OK,
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


def test_a_real_sidecars_usage_passes_every_check_and_counts(
    control_plane: LocalControlPlane, api_client, ingest: tuple[str, str, Path], namespace: str,
    tmp_path: Path,
):  # fmt: skip
    """`costwarden gateway --mode sidecar`, as the webhook injects it, reporting with its
    pod-bound token: the operator recomputes team, job and cost and agrees with every record."""
    url, home, ca = ingest
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    upstream = FakeUpstream()
    with ServerThread(upstream.app) as upstream_server:
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object(
            "costwarden.io", "v1alpha1", namespace, "routingpolicies",
            {"apiVersion": "costwarden.io/v1alpha1", "kind": "RoutingPolicy",
             "metadata": {"name": "routing"},
             "spec": {"models": [{"name": "m", "provider": "OpenAI", "locality": "InCluster",
                                  "endpoint": f"{upstream_server.url}/v1",
                                  "upstreamModel": "gpt-4o-mini",
                                  "pricing": {"inputPerMTokUSD": "1", "outputPerMTokUSD": "2"}}],
                      "defaultModel": "m"}},
        )  # fmt: skip
        custom.create_namespaced_custom_object(
            "costwarden.io", "v1alpha1", namespace, "teambudgets",
            {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
             "metadata": {"name": "team"},
             "spec": {"hardCapUSD": 5, "routingPolicyRef": {"name": "routing"}}},
        )  # fmt: skip
        client.BatchV1Api(api_client).create_namespaced_job(namespace, {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "nightly"},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "serviceAccountName": "agent", "restartPolicy": "Never",
                "containers": [{"name": "agent", "image": "busybox:1.36"}],
            }}},
        })  # fmt: skip
        pod = wait_for(
            lambda: next(iter(core.list_namespaced_pod(
                namespace, label_selector="batch.kubernetes.io/job-name=nightly").items), None),
            timeout=60, what="the Job controller's pod",
        )  # fmt: skip
        token_file = tmp_path / "token"
        token_file.write_text(_token(control_plane, namespace, "--bound-object-kind", "Pod",
                                     "--bound-object-name", pod.metadata.name))  # fmt: skip
        labels = tmp_path / "labels"
        labels.write_text("".join(f'{k}="{v}"\n' for k, v in pod.metadata.labels.items()))
        mirror = ConfigMirror(api_client, home, tmp_path / "gateway-config.json")
        wait_for(lambda: mirror.has_team(f"{namespace}/team"), timeout=60, what="config")
        port = free_port()
        log = (tmp_path / "sidecar.log").open("ab")
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "costwarden", "gateway", "--mode", "sidecar",
             "--config", str(mirror.path), "--pod-labels-file", str(labels),
             "--host", "127.0.0.1", "--port", str(port), "--ledger", str(tmp_path / "ledger"),
             "--report-to", url.removesuffix("/v1/usage"), "--report-token-file", str(token_file),
             "--report-ca-file", str(ca),
             "--replica-id", pod.metadata.name, "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAMESPACE": namespace, "POD_NAME": pod.metadata.name},
        )  # fmt: skip
        try:
            wait_for(lambda: _ready(f"http://127.0.0.1:{port}/readyz"), timeout=30, what="sidecar")
            agent = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                  max_retries=0)  # fmt: skip
            for n in range(3):
                agent.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"Question {n}?"}]
                )
            expected = _bill(upstream)
            assert expected > 0
            status = wait_for(
                lambda: (s := _status(api_client, namespace)).get("spentExactUSD")
                == format(expected.normalize(), "f") and s,
                timeout=30, what="the sidecar's usage counted at the policy's prices",
            )  # fmt: skip
            assert [j["name"] for j in status["byJob"]["jobs"]] == ["nightly"]
            assert [c["source"].partition("#")[0] for c in status["ingestion"]["cursors"]] == [
                f"pod:{namespace}/{pod.metadata.name}/{pod.metadata.uid}"
            ]
            assert "refused" not in (tmp_path / "sidecar.log").read_text()
        finally:
            sidecar.terminate()
            sidecar.wait(30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _bill(upstream: FakeUpstream) -> Decimal:
    """What the upstream's reported usage costs at 1 USD (input, cached reads too: their
    price defaults to the input price) and 2 USD (output) per million tokens."""
    total = Decimal(0)
    for call in list(upstream.calls):
        usage = call.usage or {}
        total += Decimal(usage.get("prompt_tokens", 0)) + 2 * Decimal(
            usage.get("completion_tokens", 0)
        )
    return total / 1_000_000


def _status(api_client: client.ApiClient, namespace: str) -> dict[str, Any]:
    budget = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", "team"
    )
    return dict(budget.get("status") or {})
