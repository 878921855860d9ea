"""Two operator replicas with Kopf peering: one works, and the other takes over when it dies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME
from costwarden.cluster import LocalControlPlane
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
PEERING = "costwarden-peering-test"
CONFIG_NAMESPACE = "costwarden-peering"
PUBLISHED = "published gateway configuration"


@pytest.fixture
def peering(control_plane: LocalControlPlane, crds) -> str:
    control_plane.kubectl(
        "apply", "--server-side", "-f", str(REPO / "charts/costwarden/crds/kopf.dev_peerings.yaml")
    )
    wait_for(
        lambda: control_plane.kubectl(
            "get", "crd/clusterkopfpeerings.kopf.dev", "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False,
        ).stdout == "True",
        what="peering CRD established",
    )  # fmt: skip
    control_plane.kubectl(
        "apply", "-f", "-",
        input=json.dumps({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                          "metadata": {"name": PEERING}}),
    )  # fmt: skip
    control_plane.kubectl("create", "namespace", CONFIG_NAMESPACE, check=False)
    return PEERING


@pytest.fixture
def replicas(
    control_plane: LocalControlPlane, peering: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    started = [
        OperatorProcess(
            str(control_plane.kubeconfig_path),
            CONFIG_NAMESPACE,
            tmp_path / f"replica-{i}.log",
            "--peering-name",
            peering,
            "--peering-lifetime",
            "10",
        )
        for i in range(2)
    ]
    yield started
    for replica in started:
        replica.stop()


def _peers(api_client: client.ApiClient) -> dict[str, Any]:
    body = client.CustomObjectsApi(api_client).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", PEERING
    )
    return dict(body.get("status") or {})


def _config_teams(api_client: client.ApiClient) -> set[str]:
    try:
        cm = client.CoreV1Api(api_client).read_namespaced_config_map(
            CONFIG_MAP_NAME, CONFIG_NAMESPACE
        )
    except client.ApiException:
        return set()
    return {team["id"] for team in json.loads(cm.data[CONFIG_MAP_KEY])["teams"]}


def _paused(replica: OperatorProcess) -> bool:
    """Whether Kopf's last word on the replica's peering state is a pause (or none: every
    replica starts paused)."""
    states = [
        line for line in replica.logs().splitlines()
        if "Pausing operations" in line or "Resuming operations" in line
    ]  # fmt: skip
    return not states or "Pausing operations" in states[-1]


def _budget(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
        "metadata": {"name": name, "namespace": namespace}, "spec": {"hardCapUSD": 1},
    }  # fmt: skip


def test_one_replica_works_and_the_other_takes_over(
    api_client: client.ApiClient, replicas: list[OperatorProcess], namespace: str
):
    custom = client.CustomObjectsApi(api_client)
    first, second = replicas
    first.start()
    custom.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", _budget(namespace, "before")
    )
    wait_for(lambda: f"{namespace}/before" in _config_teams(api_client), timeout=60)
    second.start()
    peers = wait_for(lambda: len(p := _peers(api_client)) >= 2 and p, timeout=60,
                     what="both replicas in the peering object")  # fmt: skip
    by_priority = sorted(peers.items(), key=lambda item: item[1]["priority"])
    leader_id = by_priority[-1][0]
    pid = {str(r.process.pid): r for r in replicas if r.process}
    leader = next(r for p, r in pid.items() if leader_id.endswith(f"@{p}"))
    standby = second if leader is first else first
    # Kopf may let a replica work for a moment at start, before it has read its peers; it
    # then pauses in favour of the stronger one. Wait for the standby to settle paused.
    wait_for(lambda: _paused(standby), timeout=60, what="the standby to settle paused")
    published_before = standby.logs().count(PUBLISHED)
    resumed_before = standby.logs().count("Resuming operations")

    leader.kill()  # a crash: no goodbye in the peering object, the keep-alive must expire
    custom.create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", _budget(namespace, "after")
    )
    wait_for(lambda: f"{namespace}/after" in _config_teams(api_client), timeout=120,
             interval=1, what="the standby to take over and publish")  # fmt: skip
    assert standby.logs().count(PUBLISHED) > published_before
    assert standby.logs().count("Resuming operations") > resumed_before, "Kopf resumed it"
