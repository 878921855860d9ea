"""``onHardCap.jobs: Delete`` and ``loopDetection.action: Delete``, with the budget's
``onHardCap.deletePropagation``, observed on the real API server with the real garbage
collector (kube-controller-manager runs in the fixture).

Each agent Job's pod (created by the real Job controller; no kubelet runs it) carries a
test finalizer, so the propagation policy shows: with ``Background`` the Job is gone at
once and the collector then deletes its pod; with ``Foreground`` the Job stays, marked
``foregroundDeletion``, until its pod is gone. The finalizer is released at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.support.polling import wait_for
from tests.support.stack import Stack, job_manifest

HOLD = "test.costwarden.io/hold"


def _pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def _read(read: Any, *args: str) -> Any:
    """The object, or None once the API server says 404."""
    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@contextmanager
def held_pod(core: client.CoreV1Api, namespace: str, job: str) -> Iterator[str]:
    """Wait for the Job's pod, add the test finalizer; remove it on the way out."""
    pod = wait_for(lambda: _pods(core, namespace, job), timeout=60, what=f"a pod of {job}")[0]
    name = pod.metadata.name
    # The Job controller's own tracking finalizer is normally there already; JSON patch
    # appends to the list, or creates it.
    add = (
        {"op": "add", "path": "/metadata/finalizers/-", "value": HOLD}
        if pod.metadata.finalizers
        else {"op": "add", "path": "/metadata/finalizers", "value": [HOLD]}
    )
    core.patch_namespaced_pod(name, namespace, [add])
    try:
        yield name
    finally:
        release(core, namespace, name)


def release(core: client.CoreV1Api, namespace: str, name: str) -> None:
    def attempt() -> bool:
        pod = _read(core.read_namespaced_pod, name, namespace)
        if pod is None or HOLD not in (pod.metadata.finalizers or []):
            return True
        rest = [f for f in pod.metadata.finalizers if f != HOLD]
        # An empty list would be a no-op in a strategic merge patch; null clears the field.
        patch = {
            "metadata": {
                "finalizers": rest or None,
                "resourceVersion": pod.metadata.resource_version,
            }
        }
        try:
            core.patch_namespaced_pod(name, namespace, patch)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False  # changed meanwhile: read again
            raise
        return True

    wait_for(attempt, timeout=30, what=f"test finalizer removed from {name}")


def _gone(core: client.CoreV1Api, namespace: str, pod: str, timeout: float = 60) -> None:
    try:
        wait_for(
            lambda: _read(core.read_namespaced_pod, pod, namespace) is None, timeout=timeout,
            what=f"pod {pod} gone",
        )  # fmt: skip
    except AssertionError as exc:
        current = _read(core.read_namespaced_pod, pod, namespace)
        raise AssertionError(f"{exc}; the pod: {current and current.metadata}") from None


def _deleting(core: client.CoreV1Api, namespace: str, pod: str) -> bool:
    current = _read(core.read_namespaced_pod, pod, namespace)
    return current is not None and current.metadata.deletion_timestamp is not None


def _actions(stack: Stack, namespace: str) -> list[tuple[str, str, str]]:
    actions = stack.status(namespace, "budget").get("recentActions") or []
    return [(a["action"], a["reason"], a["target"]) for a in actions]


def test_hard_cap_delete_with_background_propagation(
    stack: Stack, namespace: str, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    team = stack.team(
        namespace, "budget", "0.0001",
        onHardCap={"jobs": "Delete", "deletePropagation": "Background"},
    )  # fmt: skip
    stack.create(namespace, job_manifest("spender", "budget"))
    with held_pod(core, namespace, "spender") as pod:
        agent = stack.gateway.agent(team, namespace, "spender")
        refused = None
        for n in range(200):
            try:
                agent.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"Step {n}."}]
                )
            except openai.RateLimitError as refusal:
                refused = refusal
                break
        assert refused is not None, "calls kept flowing past the cap"
        # The call that no longer fits is refused, and its refusal trips the cap.
        assert refused.body["code"] == "budget_reservation_failed"
        assert refused.response.headers["x-should-retry"] == "false"

        # Background: the Job goes at once, though its pod cannot go yet...
        wait_for(
            lambda: _read(stack.batch.read_namespaced_job, "spender", namespace) is None,
            timeout=30, what="the Job deleted",
        )  # fmt: skip
        # ...and the garbage collector then deletes the pod it owned.
        wait_for(lambda: _deleting(core, namespace, pod), timeout=60, what="the pod collected")
        assert _read(core.read_namespaced_pod, pod, namespace) is not None, "held, not gone"
    _gone(core, namespace, pod)
    wait_for(lambda: _actions(stack, namespace), timeout=15, what="the action in status")
    assert _actions(stack, namespace) == [("Deleted", "HardCapReached", f"Job/{namespace}/spender")]


def test_loop_delete_with_foreground_propagation_spares_the_other_job(
    stack: Stack, namespace: str, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    team = stack.team(
        namespace, "budget", "10",
        loopDetection={"identicalRequests": 3, "windowSeconds": 300, "action": "Delete"},
        onHardCap={"jobs": "Suspend", "deletePropagation": "Foreground"},
    )  # fmt: skip
    stack.create(namespace, job_manifest("looper", "budget"))
    stack.create(namespace, job_manifest("worker", "budget"))
    same = [{"role": "user", "content": "Retry the failing migration exactly as before."}]
    with held_pod(core, namespace, "looper") as pod:
        looper = stack.gateway.agent(team, namespace, "looper")
        worker = stack.gateway.agent(team, namespace, "worker")
        refused = None
        for _ in range(3):
            try:
                looper.chat.completions.create(model="gpt-4o-mini", messages=same)
            except openai.RateLimitError as refusal:
                refused = refusal
                break
        assert refused is not None, "the loop was not refused"
        assert refused.body["code"] == "retry_loop_detected"

        # Foreground: the Job is marked for deletion and waits for its pod.
        job = wait_for(
            lambda: (j := _read(stack.batch.read_namespaced_job, "looper", namespace))
            and j.metadata.deletion_timestamp and j,
            timeout=30, what="the Job being deleted",
        )  # fmt: skip
        assert "foregroundDeletion" in (job.metadata.finalizers or [])
        wait_for(lambda: _deleting(core, namespace, pod), timeout=60, what="the pod collected")
        still = _read(stack.batch.read_namespaced_job, "looper", namespace)
        assert still is not None, "a foreground deletion waits for the Job's pod"
    wait_for(
        lambda: _read(stack.batch.read_namespaced_job, "looper", namespace) is None,
        timeout=60, what="the Job gone after its pod",
    )  # fmt: skip
    worker.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Carry on."}]
    )
    worker_job = stack.job(namespace, "worker")
    assert worker_job.metadata.deletion_timestamp is None
    assert not worker_job.spec.suspend
    wait_for(lambda: _actions(stack, namespace), timeout=15, what="the action in status")
    assert _actions(stack, namespace) == [
        ("Deleted", "RetryLoopDetected", f"Job/{namespace}/looper")
    ]
