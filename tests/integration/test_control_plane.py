"""The local control plane is a real Kubernetes API with a working Job controller."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from kubernetes import client

from costwarden.cluster import LocalControlPlane

T = TypeVar("T")

_DEADLINE_SECONDS = 60.0


def eventually(probe: Callable[[], T | None], what: str, timeout: float = _DEADLINE_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)  # poll interval; the deadline is what bounds the wait
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def test_apiserver_reports_built_version(api_client: client.ApiClient) -> None:
    version = client.VersionApi(api_client).get_code()
    assert version.git_version == "v1.34.4"
    assert (version.major, version.minor) == ("1", "34")


def _job(name: str, parallelism: int) -> client.V1Job:
    container = client.V1Container(name="work", image="busybox:1.36", command=["sleep", "3600"])
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            suspend=False,
            parallelism=parallelism,
            completions=parallelism,
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(restart_policy="Never", containers=[container])
            ),
        ),
    )


def test_job_controller_creates_pods_and_honours_suspend(
    api_client: client.ApiClient, namespace: str
) -> None:
    batch = client.BatchV1Api(api_client)
    core = client.CoreV1Api(api_client)
    batch.create_namespaced_job(namespace, _job("agent-run", parallelism=2))
    selector = "batch.kubernetes.io/job-name=agent-run"

    def live_pods() -> list[client.V1Pod]:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        return [pod for pod in pods if pod.metadata and pod.metadata.deletion_timestamp is None]

    pods = eventually(lambda: p if len(p := live_pods()) == 2 else None, "2 Job pods")
    # No kubelet runs, so the pods are created but never scheduled.
    assert all(pod.status and pod.status.phase == "Pending" for pod in pods)

    batch.patch_namespaced_job("agent-run", namespace, {"spec": {"suspend": True}})

    def suspended_condition() -> client.V1JobCondition | None:
        job = batch.read_namespaced_job("agent-run", namespace)
        conditions = (job.status and job.status.conditions) or []
        return next((c for c in conditions if c.type == "Suspended" and c.status == "True"), None)

    condition = eventually(suspended_condition, "the Suspended condition")
    assert condition.reason == "JobSuspended"
    eventually(
        lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items,
        "the Job controller to delete the suspended Job's pods",
    )
    status = batch.read_namespaced_job("agent-run", namespace).status
    assert status is not None
    assert not status.active


def test_kubectl_from_extracted_tools(control_plane: LocalControlPlane, namespace: str) -> None:
    result = control_plane.kubectl("get", "ns", "-o", "name")
    names = result.stdout.split()
    assert "namespace/default" in names
    assert f"namespace/{namespace}" in names


def test_helm_from_extracted_tools(control_plane: LocalControlPlane) -> None:
    assert control_plane.helm("version", "--short").stdout.startswith("v")
    # `helm list` needs the API server, not just the binary.
    assert control_plane.helm("list", "--all-namespaces").returncode == 0
