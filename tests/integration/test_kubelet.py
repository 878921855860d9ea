"""The process kubelet on the real control plane: Deployments' pods run (each replica in
its own network namespace, all on the same port), Services route to them by name, Secret
volumes follow updates, projected tokens carry the audience asked for, Job pods end
Succeeded or Failed, and a deleted pod's processes stop."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from costwarden.cluster import LocalControlPlane
from costwarden.cluster.kubelet import ProcessKubelet
from tests.support.polling import wait_for

SERVE = ["python", "-m", "http.server", "8000", "--directory", "/srv"]


@pytest.fixture(scope="module")
def kubelet_namespace(control_plane: LocalControlPlane) -> Iterator[str]:
    name = f"cw-kubelet-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def kubelet(control_plane: LocalControlPlane, kubelet_namespace: str) -> Iterator[ProcessKubelet]:
    with ProcessKubelet(control_plane.kubeconfig_path, namespaces={kubelet_namespace}) as running:
        yield running
        latencies = sorted(round(x, 2) for x in running.pod_start_latencies)
        print(f"pod start latencies (s): {latencies}")


def apply(plane: LocalControlPlane, namespace: str, *documents: dict[str, Any]) -> None:
    result = plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents), check=False
    )
    assert result.returncode == 0, result.stderr


def pods(api: client.ApiClient, namespace: str, selector: str) -> list[client.V1Pod]:
    return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items


def ready(pod: client.V1Pod) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def fetch(pod: client.V1Pod, path: str) -> str | None:
    # The host routes to the pods' bridge, so a test reaches a pod at its IP.
    try:
        answer = httpx.get(f"http://{pod.status.pod_ip}:8000/{path}", timeout=2)
    except httpx.HTTPError:
        return None
    return answer.text if answer.status_code == 200 else None


def test_deployment_replicas_run_on_one_port_behind_their_service(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    kubelet: ProcessKubelet,
    kubelet_namespace: str,
):
    ns = kubelet_namespace
    apply(
        control_plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "site"},
            "stringData": {"hello": "first"},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": "python:3.12",
                                "command": SERVE,
                                "ports": [{"name": "http", "containerPort": 8000}],
                                "readinessProbe": {"httpGet": {"path": "/hello", "port": "http"}},
                                "volumeMounts": [
                                    {"name": "site", "mountPath": "/srv", "readOnly": True}
                                ],
                            }
                        ],
                        "volumes": [{"name": "site", "secret": {"secretName": "site"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    )
    replicas = wait_for(
        lambda: (
            [p for p in pods(api_client, ns, "app=web") if ready(p)]
            if len([p for p in pods(api_client, ns, "app=web") if ready(p)]) == 2
            else None
        ),
        timeout=60,
        what="two Ready replicas",
    )
    assert len({p.status.pod_ip for p in replicas}) == 2
    assert all(fetch(p, "hello") == "first" for p in replicas)

    # Another pod reaches them through the Service's name (per-pod /etc/hosts + proxy).
    apply(
        control_plane,
        ns,
        job(
            "curl",
            "import urllib.request as u; "
            "print(u.urlopen('http://web/hello').read().decode()); "
            f"print(u.urlopen('http://web.{ns}.svc.cluster.local/hello')"
            ".read().decode())",
        ),
    )
    assert finished(api_client, ns, "curl") == "Succeeded", kubelet.logs(
        ns, pod_of(api_client, ns, "curl"), "main"
    )
    assert kubelet.logs(ns, pod_of(api_client, ns, "curl"), "main").count("first") == 2

    # A Secret change reaches the running process's volume (the ..data symlink swap).
    client.CoreV1Api(api_client).patch_namespaced_secret(
        "site", ns, {"stringData": {"hello": "second"}}
    )
    wait_for(
        lambda: all(fetch(p, "hello") == "second" for p in replicas),
        timeout=15,
        what="the Secret update seen by both replicas",
    )


def job(name: str, code: str, **pod_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "python:3.12", "command": ["python", "-c", code]}
                    ],
                    **pod_spec,
                }
            },
        },
    }


def pod_of(api: client.ApiClient, namespace: str, job_name: str) -> str:
    return str(pods(api, namespace, f"job-name={job_name}")[0].metadata.name)


def finished(api: client.ApiClient, namespace: str, name: str) -> str:
    batch = client.BatchV1Api(api)
    done = wait_for(
        lambda: (
            (j := batch.read_namespaced_job(name, namespace)).status
            and (j.status.succeeded or j.status.failed)
            and j
        ),
        timeout=60,
        what=f"Job {name} finished",
    )
    phase = pods(api, namespace, f"job-name={name}")[0].status.phase
    assert phase == ("Succeeded" if done.status.succeeded else "Failed")
    return str(phase)


def test_job_pods_end_succeeded_or_failed(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    kubelet: ProcessKubelet,
    kubelet_namespace: str,
):
    apply(
        control_plane,
        kubelet_namespace,
        job("passes", "print('done')"),
        job("fails", "raise SystemExit(3)"),
    )
    assert finished(api_client, kubelet_namespace, "passes") == "Succeeded"
    assert finished(api_client, kubelet_namespace, "fails") == "Failed"
    failed = pods(api_client, kubelet_namespace, "job-name=fails")[0]
    assert failed.status.container_statuses[0].state.terminated.exit_code == 3


def test_projected_token_carries_the_requested_audience(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    kubelet: ProcessKubelet,
    kubelet_namespace: str,
):
    ns, audience = kubelet_namespace, "example.com/costwarden-test"
    volume = {
        "name": "token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": audience,
                        "expirationSeconds": 600,
                        "path": "t",
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    }
                },
            ]
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "holder"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "python:3.12",
                    "command": SERVE,
                    "volumeMounts": [{"name": "token", "mountPath": "/srv"}],
                }
            ],
            "volumes": [volume],
        },
    }
    apply(control_plane, ns, pod)
    core = client.CoreV1Api(api_client)
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("holder", ns)) and ready(p) and p,
        timeout=60,
        what="the token holder Ready",
    )
    token = wait_for(lambda: fetch(running, "t"), timeout=10, what="the token file")
    assert fetch(running, "name") == "holder"

    review = review_token(api_client, token, [audience])
    assert review["authenticated"] is True
    assert review["user"]["username"] == f"system:serviceaccount:{ns}:default"
    assert review["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["holder"]
    # For the API server's own audience the same token is worthless.
    assert not review_token(api_client, token, None).get("authenticated")


def review_token(api: client.ApiClient, token: str, audiences: list[str] | None) -> dict[str, Any]:
    spec = client.V1TokenReviewSpec(token=token, audiences=audiences)
    response = client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=spec), _preload_content=False
    )
    status: dict[str, Any] = json.loads(response.data)["status"]
    return status


def test_deleting_a_pod_stops_its_process_and_finalises_it(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    kubelet: ProcessKubelet,
    kubelet_namespace: str,
):
    ns = kubelet_namespace
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "c",
                    "image": "python:3.12",
                    "command": [
                        "python",
                        "-c",
                        "import os, time; print(os.getpid(), flush=True); time.sleep(600)",
                    ],
                }
            ],
        },
    }
    apply(control_plane, ns, pod)
    core = client.CoreV1Api(api_client)
    running = wait_for(
        lambda: (p := core.read_namespaced_pod("sleeper", ns)) and ready(p) and p,
        timeout=60,
        what="the sleeper running",
    )
    container_id = running.status.container_statuses[0].container_id
    pid = int(container_id.removeprefix("process://"))
    assert _alive(pid)
    started = time.monotonic()
    core.delete_namespaced_pod("sleeper", ns)
    wait_for(lambda: not _alive(pid), timeout=10, what="the process stopped")
    wait_for(
        lambda: not [p for p in core.list_namespaced_pod(ns).items if p.metadata.name == "sleeper"],
        timeout=10,
        what="the pod finalised",
    )
    assert time.monotonic() - started < 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_a_crashing_container_is_restarted_with_backoff(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    kubelet: ProcessKubelet,
    kubelet_namespace: str,
):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "crasher"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "python:3.12",
                    "command": ["python", "-c", "raise SystemExit(7)"],
                }
            ]
        },
    }
    apply(control_plane, kubelet_namespace, pod)
    core = client.CoreV1Api(api_client)
    status = wait_for(
        lambda: (
            (s := core.read_namespaced_pod("crasher", kubelet_namespace).status)
            and s.container_statuses
            and s.container_statuses[0].restart_count >= 2
            and s
        ),
        timeout=30,
        what="two restarts (restartPolicy Always)",
    )
    container = status.container_statuses[0]
    last = container.last_state.terminated
    assert last is not None
    assert last.exit_code == 7
    assert status.phase == "Running"
