"""Runaway jobs are stopped alone: a retry loop, or a job past its own per-job cap; the
team's other jobs keep running and calling. And the ingestion refuses strangers."""

from __future__ import annotations

from collections.abc import Callable

import openai

from tests.support.polling import wait_for
from tests.support.stack import Stack, job_manifest

SAME = [{"role": "user", "content": "Retry the failing migration exactly as before."}]


def until_refused(
    messages: Callable[[int], list[dict[str, str]]], agent: openai.OpenAI, attempts: int = 50
) -> openai.RateLimitError:
    """Call until the gateway answers 429; fail if it never does within ``attempts``."""
    for n in range(attempts):
        try:
            agent.chat.completions.create(model="gpt-4o-mini", messages=messages(n))
        except openai.RateLimitError as refusal:
            return refusal
    raise AssertionError(f"no 429 after {attempts} calls")


def test_a_retry_loop_suspends_that_job_alone(stack: Stack, namespace: str):
    team = stack.team(
        namespace, "budget", "10", loopDetection={"identicalRequests": 3, "windowSeconds": 300}
    )
    stack.create(namespace, job_manifest("looper", "budget"))
    stack.create(namespace, job_manifest("worker", "budget"))
    looper = stack.gateway.agent(team, namespace, "looper")
    worker = stack.gateway.agent(team, namespace, "worker")

    refusal = until_refused(lambda n: SAME, looper, attempts=3)
    assert refusal.body["code"] == "retry_loop_detected"

    job = wait_for(
        lambda: (j := stack.job(namespace, "looper")).spec.suspend and j,
        timeout=10, what="looping Job suspended",
    )  # fmt: skip
    assert job.metadata.annotations["costwarden.io/stopped-reason"] == "RetryLoopDetected"
    assert job.metadata.labels["costwarden.io/suspended-for"] == "job"
    for n in range(3):  # the other job of the team keeps working
        worker.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"Step {n}."}]
        )
    assert not stack.job(namespace, "worker").spec.suspend
    # The Job is patched first and the budget's status after it: wait for the record.
    actions = wait_for(
        lambda: stack.status(namespace, "budget").get("recentActions"),
        timeout=10, what="the suspension recorded in status.recentActions",
    )  # fmt: skip
    assert [(a["action"], a["reason"], a["target"]) for a in actions] == [
        ("Suspended", "RetryLoopDetected", f"Job/{namespace}/looper")
    ]


def test_a_job_past_its_per_job_cap_is_suspended_alone(stack: Stack, namespace: str):
    team = stack.team(namespace, "budget", "10", perJob={"maxCostUSD": "0.0001"})
    stack.create(namespace, job_manifest("greedy", "budget"))
    stack.create(namespace, job_manifest("frugal", "budget"))
    greedy = stack.gateway.agent(team, namespace, "greedy")
    frugal = stack.gateway.agent(team, namespace, "frugal")
    frugal.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "One question."}]
    )
    refusal = until_refused(lambda n: [{"role": "user", "content": f"Question {n}."}], greedy)
    # Reserved before forwarding: the call that would not fit is refused, never the cap passed.
    assert refusal.body["code"] == "budget_reservation_failed"
    assert refusal.response.headers["x-costwarden-reservation-limit"] == "job_cost"
    assert refusal.response.headers["x-should-retry"] == "false"
    job = wait_for(
        lambda: (j := stack.job(namespace, "greedy")).spec.suspend and j,
        timeout=10, what="Job past its per-job cap suspended",
    )  # fmt: skip
    assert job.metadata.annotations["costwarden.io/stopped-reason"] == "PerJobCapReached"
    assert "perJob.maxCostUSD" in job.metadata.annotations["costwarden.io/stopped-message"]
    assert not stack.job(namespace, "frugal").spec.suspend


def test_ingestion_refuses_unauthenticated_and_forged_senders(stack: Stack):
    url, ingest = stack.ingest_url, stack.ingest_client()
    batch = {"source": "intruder", "items": []}
    assert ingest.post(url, json=batch).status_code == 401
    forged = ingest.post(url, json=batch, headers={"Authorization": "Bearer not-the-token"})
    assert forged.status_code == 401
    assert forged.json()["error"]["code"] == "unauthorized"
    token = stack.token_file.read_text().strip()
    accepted = ingest.post(url, json=batch, headers={"Authorization": f"Bearer {token}"})
    assert accepted.status_code == 200
    assert accepted.json()["ackedSeq"] == 0
