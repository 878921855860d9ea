"""Cost per result: finished agent Jobs counted by outcome with their spend, so status shows
the cost per succeeded Job and the spend wasted on failed or stopped ones."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from kubernetes import client

from tests.support.polling import wait_for
from tests.support.stack import Stack, job_manifest

SAME = [{"role": "user", "content": "Run the flaky test again."}]


def spend(agent: openai.OpenAI, calls: int, tag: str) -> None:
    for n in range(calls):
        agent.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"{tag} {n}"}]
        )


def finish_pods(api_client: client.ApiClient, namespace: str, job: str, phase: str) -> bool:
    """Without a kubelet, play its part: the Job's pod ends with ``phase``."""
    core = client.CoreV1Api(api_client)
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    for pod in pods:
        core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {"phase": phase}})
    return bool(pods)


def job_spend(stack: Stack, namespace: str) -> dict[str, Decimal]:
    jobs = (stack.status(namespace, "budget").get("byJob") or {}).get("jobs") or []
    return {j["name"]: Decimal(j["spentUSD"]) for j in jobs}


def test_results_by_outcome_give_cost_per_succeeded_job_and_waste(
    stack: Stack, namespace: str, api_client: client.ApiClient
):
    team = stack.team(
        namespace, "budget", "10", loopDetection={"identicalRequests": 2, "windowSeconds": 300}
    )
    for name in ("good", "bad", "loop"):
        stack.create(namespace, job_manifest(name, "budget"))
    spend(stack.gateway.agent(team, namespace, "good"), 3, "good")
    spend(stack.gateway.agent(team, namespace, "bad"), 2, "bad")
    looper = stack.gateway.agent(team, namespace, "loop")
    looper.chat.completions.create(model="gpt-4o-mini", messages=SAME)
    with pytest.raises(openai.RateLimitError):  # the second identical request trips it
        looper.chat.completions.create(model="gpt-4o-mini", messages=SAME)
    wait_for(lambda: stack.job(namespace, "loop").spec.suspend, timeout=10, what="loop stopped")
    spent = wait_for(
        lambda: (s := job_spend(stack, namespace)) and len(s) == 3 and s,
        timeout=10, what="spend of the three jobs",
    )  # fmt: skip

    wait_for(lambda: finish_pods(api_client, namespace, "good", "Succeeded"), timeout=30)
    wait_for(lambda: finish_pods(api_client, namespace, "bad", "Failed"), timeout=30)
    client.BatchV1Api(api_client).delete_namespaced_job(
        "loop", namespace, propagation_policy="Background"
    )  # deleted while suspended by costwarden: stopped, not failed

    def results():
        found = stack.status(namespace, "budget").get("results") or {}
        counted = [found.get(k, {}).get("jobs") for k in ("succeeded", "failed",
                                                          "stoppedByCostwarden")]  # fmt: skip
        return found if counted == [1, 1, 1] else None

    found = wait_for(results, timeout=60, what="three finished jobs counted")
    assert Decimal(found["succeeded"]["spentUSD"]) == spent["good"]
    assert Decimal(found["failed"]["spentUSD"]) == spent["bad"]
    assert Decimal(found["stoppedByCostwarden"]["spentUSD"]) == spent["loop"]
    assert Decimal(found["costPerSucceededJobUSD"]) == spent["good"].quantize(Decimal("0.000001"))
    assert Decimal(found["wastedUSD"]) == spent["bad"] + spent["loop"]
    outcomes = {
        j["name"]: j.get("outcome") for j in stack.status(namespace, "budget")["byJob"]["jobs"]
    }
    assert outcomes == {"good": "Succeeded", "bad": "Failed", "loop": "StoppedByCostwarden"}
