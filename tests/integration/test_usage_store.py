"""The operator with ``--store-dir`` writes every acknowledged record to the usage store
once, with the prices and the contract discount its cost was recomputed with; a re-sent
batch writes nothing; the FOCUS export of the store applies the discount."""

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

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

POD = "agent-pod"


@pytest.fixture
def operator(
    control_plane: LocalControlPlane, crds, api_client: client.ApiClient, tmp_path: Path
) -> Iterator[tuple[str, ssl.SSLContext, Path]]:
    home = f"cw-store-{free_port()}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    port = free_port()
    store = tmp_path / "store"
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), home, tmp_path / "operator.log",
        "--standalone", "--ingest-port", str(port), "--ingest-listen-address", "127.0.0.1",
        "--ingest-allow-sidecars", "--ingest-cert-dir", str(tmp_path / "ingest-tls"),
        "--store-dir", str(store),
    ).start()  # fmt: skip
    ca = tmp_path / "ingest-tls" / "ca.crt"
    wait_for(ca.exists, timeout=60, what="the ingestion certificate")
    context = ssl.create_default_context(cafile=str(ca))
    process.wait_http_ok(f"https://127.0.0.1:{port}/healthz", timeout=60, context=context)
    yield f"https://127.0.0.1:{port}/v1/usage", context, store
    process.stop()
    core.delete_namespace(home)


@pytest.fixture
def agent(api_client: client.ApiClient, crds, namespace: str) -> str:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=POD),
        spec=client.V1PodSpec(service_account_name="agent",
                              containers=[client.V1Container(name="a", image="busybox:1.36")]),
    ))  # fmt: skip
    custom = client.CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "routingpolicies",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "RoutingPolicy",
         "metadata": {"name": "routing"},
         "spec": {"models": [{"name": "m", "provider": "OpenAI",
                              "endpoint": "https://api.openai.com/v1", "discountPercent": "20",
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


def _batch(namespace: str) -> dict[str, Any]:
    record = UsageRecord(
        time=datetime.now(UTC), team=f"{namespace}/team", namespace=namespace, pod=POD,
        caller="sidecar", endpoint=Endpoint.CHAT_COMPLETIONS, served_model="m",
        usage_reported=True, tokens=TokenUsage(input=250_000, output=100_000),
        cost_usd=Decimal("0.45"), outcome=Outcome.OK,
    )  # fmt: skip
    return UsageBatch(
        source=f"{namespace}/{POD}", items=[BatchItem(seq=1, record=record)]
    ).to_wire()


def _post(url: str, context: ssl.SSLContext, token: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_acknowledged_usage_lands_in_the_store_once_with_its_discount(
    control_plane: LocalControlPlane, api_client, operator, agent: str, tmp_path: Path
) -> None:
    from costwarden.cli import main
    from costwarden.store import query

    url, context, store = operator
    token = control_plane.kubectl(
        "create", "token", "agent", "-n", agent, "--audience", SIDECAR_REPORT_AUDIENCE,
        "--bound-object-kind", "Pod", "--bound-object-name", POD,
    ).stdout.strip()  # fmt: skip
    body = _batch(agent)
    wait_for(lambda: _post(url, context, token, body) == 200, timeout=60, what="batch acked")
    assert _post(url, context, token, body) == 200  # re-sent: a no-op everywhere

    con = query.connect(store)
    rows = con.execute(
        "SELECT team, cost_usd, input_price_per_m_usd, discount_percent, locality FROM usage"
    ).fetchall()
    assert rows == [(f"{agent}/team", Decimal("0.45"), Decimal(1), Decimal(20), "External")]
    raw = con.execute("SELECT count(*) FROM usage_raw").fetchone()
    assert raw == (1,)  # one row on disk, not one per delivery

    out = tmp_path / "focus.parquet"
    period = datetime.now(UTC).strftime("%Y-%m")
    assert main(["export", "focus", "--store", str(store), "--period", period,
                 "--file", str(out)]) == 0  # fmt: skip
    import pyarrow.parquet as pq

    focus = pq.read_table(out).to_pylist()
    assert sum(r["ListCost"] for r in focus) == Decimal("0.45")
    assert sum(r["EffectiveCost"] for r in focus) == Decimal("0.36")  # 20 % off


def test_reconcile_posts_a_warning_event_on_the_teambudget(
    control_plane: LocalControlPlane, api_client, agent: str, tmp_path: Path
) -> None:
    """A difference (usage the provider saw and costwarden did not) becomes a Warning
    Event on the named TeamBudget; the exit status says so too."""
    from costwarden.cli import main

    store = tmp_path / "empty-store"
    store.mkdir()
    page = {"object": "page", "has_more": False, "next_page": None, "data": [{
        "object": "bucket", "start_time": 1793664000, "end_time": 1793750400, "results": [{
            "object": "organization.usage.completions.result", "input_tokens": 1000,
            "output_tokens": 100, "input_cached_tokens": 0, "num_model_requests": 1,
            "model": "gpt-4.1-2025-04-14", "api_key_id": "key_laptop"}]}]}  # fmt: skip
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps(page))
    code = main([
        "reconcile", "--provider", "openai", "--from", str(usage), "--store", str(store),
        "--period", "2026-11", "--event-on", f"{agent}/team",
        "--kubeconfig", str(control_plane.kubeconfig_path),
    ])  # fmt: skip
    assert code == 1
    events = client.CoreV1Api(api_client).list_namespaced_event(agent).items
    [event] = [e for e in events if e.reason == "ReconciliationMismatch"]
    assert event.type == "Warning"
    assert event.involved_object.kind == "TeamBudget"
    assert event.involved_object.name == "team"
    assert "calls around the gateway" in event.message
