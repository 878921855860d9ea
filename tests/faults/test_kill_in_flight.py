"""kill -9 of the gateway with calls in flight, on the real control plane (issue #12 (c)): the
gateway reports to the operator through its ledger; the calls the kill cuts off were sent
to the (slow) upstream and never answered. After the restart the operator's books hold
each of them exactly once at its reservation: ``spentExactUSD`` == the upstream's bill of
the answered calls + the reservations of the interrupted ones, and the operator, which
recomputes every cost from the policy's prices, accepted them all."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import orjson

from costwarden.api.catalog import default_catalog
from costwarden.api.routingpolicy import ModelBackend, Provider
from costwarden.policy import reservation as reserve
from costwarden.policy.pricing import resolve_pricing
from tests.faults.faults import BUDGET, applied_records, spent_exact, summary
from tests.support.polling import wait_for
from tests.support.stack import MODEL, Stack, job_manifest, upstream_cost

SETTLED = 10
IN_FLIGHT = 6
MAX_TOKENS = 900
LATENCY = 8.0


def body(label: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"call {label}"}],
        "max_tokens": MAX_TOKENS,
    }


def interrupted_metric(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    prefix = "costwarden_gateway_interrupted_calls_total{"
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(prefix))  # fmt: skip


def test_calls_in_flight_at_a_gateway_kill_reach_the_books_at_their_reservation(
    stack: Stack, namespace: str, ports: dict[str, int]
) -> None:
    team = stack.team(namespace, BUDGET, "100")
    stack.create(namespace, job_manifest("agent", BUDGET))
    sdk = stack.gateway.agent(team, namespace, "agent")
    for i in range(SETTLED):
        assert sdk.chat.completions.create(**body(f"settled {i:03d}")).usage is not None
    fake = stack.upstream
    pricing = resolve_pricing(
        ModelBackend(name=MODEL, provider=Provider.OPENAI, endpoint="https://api.example.com/v1"),
        default_catalog(),
    )
    assert pricing is not None
    prompt = reserve.prompt_token_bound(orjson.dumps(body("flight 000")))
    reservation = reserve.worst_cost(prompt, MAX_TOKENS, pricing)

    fake.latency = LATENCY
    failures: list[BaseException] = []

    def call(i: int) -> None:
        client = openai.OpenAI(
            base_url=stack.gateway.url + "/v1", api_key=sdk.api_key, max_retries=0, timeout=60
        )
        try:
            client.chat.completions.create(**body(f"flight {i:03d}"))
        except openai.APIConnectionError as exc:
            failures.append(exc)

    callers = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(IN_FLIGHT)]
    for caller in callers:
        caller.start()
    wait_for(lambda: fake.waiting == IN_FLIGHT, timeout=30, what="every call at the upstream")
    stack.gateway.kill()  # SIGKILL with IN_FLIGHT calls sent and unanswered
    bill_of_answered = upstream_cost(fake)  # the interrupted ones are still upstream
    assert len(fake.calls) == SETTLED
    for caller in callers:
        caller.join(30)
    assert len(failures) == IN_FLIGHT
    fake.latency = 0.0
    stack.gateway.start()  # same ledger: charges the holds, then re-sends what is unacked

    expected = bill_of_answered + IN_FLIGHT * reservation
    wait_for(lambda: spent_exact(stack, namespace) == expected, timeout=90, interval=0.5,
             what=f"spend = answered {bill_of_answered} + {IN_FLIGHT} x {reservation}")  # fmt: skip
    assert applied_records(stack, namespace) == SETTLED + IN_FLIGHT
    assert interrupted_metric(ports["gateway_metrics"]) == IN_FLIGHT

    # The provider billed them (its own usage, once its wait ended): never more than charged.
    wait_for(lambda: len(fake.calls) == SETTLED + IN_FLIGHT, timeout=LATENCY + 30,
             what="the upstream finishing the interrupted calls")  # fmt: skip
    billed = upstream_cost(fake) - bill_of_answered
    assert billed <= IN_FLIGHT * reservation

    # Another kill, idle this time, and a call after it: the books grow by that call only.
    stack.gateway.kill()
    stack.gateway.start()
    assert sdk.chat.completions.create(**body("after")).usage is not None
    last = upstream_cost(fake) - bill_of_answered - billed
    wait_for(lambda: spent_exact(stack, namespace) == expected + last, timeout=60, interval=0.5,
             what="the call after the second restart applied, nothing charged twice")  # fmt: skip
    assert applied_records(stack, namespace) == SETTLED + IN_FLIGHT + 1
    print(summary(
        fault="kill -9 with calls in flight", settled=SETTLED, interrupted=IN_FLIGHT,
        reservation=reservation, provider_billed_interrupted=billed,
        charged_interrupted=IN_FLIGHT * reservation, spent=expected + last,
    ))  # fmt: skip
