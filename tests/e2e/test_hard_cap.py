"""Issue #4's done-when, with issue #12's reservations: an agent Job calling through the
gateway with the official openai SDK until its team's hard cap. Each call's worst case is
reserved before it is forwarded, so spend never passes the cap: the first call whose worst
case (at the default output ceiling) no longer fits what is left is refused (429
budget_reservation_failed, not to be retried), that refusal trips the cap, and the Job is
suspended within 5 s of it. Status spend equals the upstream's usage priced exactly,
Events and the Job's annotations say why, and raising the cap resumes the Job."""

from __future__ import annotations

import time
from decimal import Decimal

import openai
from kubernetes import client

from tests.support.polling import wait_for
from tests.support.stack import Stack, floor6, job_manifest, upstream_cost

QUESTION = [{"role": "user", "content": "Summarise the build log, call {n}."}]
MAX_TOKENS = 20
CAP = Decimal("0.0002")


def ask(agent: openai.OpenAI, n: int) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": QUESTION[0]["content"].format(n=n)}]
    return agent.chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_tokens=MAX_TOKENS
    )


def events_for(api_client: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    core = client.CoreV1Api(api_client)
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items


def test_hard_cap_suspends_the_job_refuses_calls_and_raising_it_resumes(
    stack: Stack, namespace: str, api_client: client.ApiClient
):
    team = stack.team(namespace, "budget", "0.0002")
    stack.create(namespace, job_manifest("agent-1", "budget"))
    agent = stack.gateway.agent(team, namespace, "agent-1")

    refusal = None
    refused_at = 0.0
    for n in range(200):
        try:
            ask(agent, n)
        except openai.RateLimitError as error:
            refusal, refused_at = error, time.monotonic()
            break
        assert upstream_cost(stack.upstream) <= CAP, "a call was admitted past the cap"
    assert refusal is not None, "calls kept flowing: the cap never stopped them"
    assert refusal.status_code == 429
    assert refusal.body["code"] == "budget_reservation_failed"
    assert "hard cap is reached" in refusal.body["message"]
    assert refusal.response.headers["x-should-retry"] == "false"
    assert upstream_cost(stack.upstream) <= CAP  # reserved before forwarding: never over
    assert len(stack.upstream.calls) >= 3, "the cap tripped before the team could spend"

    job = wait_for(
        lambda: (j := stack.job(namespace, "agent-1")).spec.suspend and j,
        timeout=5 - (time.monotonic() - refused_at),
        interval=0.05,
        what="agent Job suspended",
    )
    assert time.monotonic() - refused_at < 5
    annotations = job.metadata.annotations
    assert annotations["costwarden.io/stopped-by"] == team
    assert annotations["costwarden.io/stopped-reason"] == "HardCapReached"
    assert "hard cap" in annotations["costwarden.io/stopped-message"]
    assert job.metadata.labels["costwarden.io/suspended-for"] == "cap"
    # The Job controller removes the suspended Job's pods.
    core = client.CoreV1Api(api_client)
    wait_for(
        lambda: not [
            p for p in core.list_namespaced_pod(namespace, label_selector="job-name=agent-1").items
            if p.metadata.deletion_timestamp is None
        ],
        timeout=30, what="pods of the suspended Job gone",
    )  # fmt: skip

    # Spend in status is the upstream's usage priced exactly (every delivered record once).
    expected = upstream_cost(stack.upstream)
    status = wait_for(
        lambda: (s := stack.status(namespace, "budget")).get("spentExactUSD") == _exact(expected)
        and s,
        timeout=10, what=f"status spend {expected}",
    )  # fmt: skip
    assert Decimal(status["spentExactUSD"]) == expected
    assert status["spentUSD"] == floor6(expected)
    assert status["byJob"]["jobs"][0]["name"] == "agent-1"
    assert status["byModel"][0]["model"] == "gpt-4o-mini"
    wait_for(lambda: stack.status(namespace, "budget").get("phase") == "Exhausted", timeout=10)
    actions = wait_for(
        lambda: stack.status(namespace, "budget").get("recentActions"),
        timeout=10, what="the suspension recorded in status.recentActions",
    )  # fmt: skip
    assert [(a["action"], a["reason"], a["target"]) for a in actions] == [
        ("Suspended", "HardCapReached", f"Job/{namespace}/agent-1")
    ]
    job_events = wait_for(
        lambda: [e for e in events_for(api_client, namespace, "agent-1")
                 if e.reason == "HardCapReached"],
        timeout=10, what="Event on the Job",
    )  # fmt: skip
    assert job_events[0].type == "Warning"
    assert team in job_events[0].message
    budget_events = wait_for(
        lambda: [e for e in events_for(api_client, namespace, "budget")
                 if e.reason == "HardCapReached"],
        timeout=10, what="Event on the TeamBudget",
    )  # fmt: skip
    assert "agent-1" in budget_events[0].message

    # A GitOps change raises the cap: Active again, the Job resumes, annotated why.
    stack.custom.patch_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", "budget",
        {"spec": {"hardCapUSD": "5"}},
    )  # fmt: skip
    resumed = wait_for(
        lambda: not (j := stack.job(namespace, "agent-1")).spec.suspend and j,
        timeout=15, what="Job resumed",
    )  # fmt: skip
    assert resumed.metadata.annotations["costwarden.io/resumed-reason"] == "CapRaised"
    assert "costwarden.io/suspended-by" not in (resumed.metadata.labels or {})
    wait_for(lambda: stack.status(namespace, "budget").get("phase") == "Active", timeout=10)
    wait_for(lambda: _calls_again(stack, agent), timeout=15, what="calls admitted again")


def _calls_again(stack: Stack, agent: openai.OpenAI) -> bool:
    try:
        ask(agent, 1000)
    except openai.RateLimitError:
        return False
    return True


def _exact(amount: Decimal) -> str:
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
