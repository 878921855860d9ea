"""Caps that hold across gateway replicas (issue #12, leases): three `costwarden gateway`
processes report to one operator on the real control plane; each reserves its calls
against the lease the operator lent it. 100 concurrent calls with a large ``max_tokens``
against a slow upstream whose answers run to their ceiling, spread over the replicas, in
rounds until nothing more is admitted.

What is checked is the money the upstream billed (its own usage, priced exactly): it never
exceeds the cap, the operator's books equal it, and the leases shown in status never lend
more than is left. A replica killed with -9 stops renewing; its lease is reclaimed once it
has been silent for a lease's life (shortened here with ``--lease-seconds``)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.support.polling import wait_for
from tests.support.stack import MODEL, Gateway, Stack, job_manifest, running_stack, upstream_cost

CAP = Decimal("0.05")
CALLS = 100
MAX_TOKENS = 400  # worst case ~$0.00026 a call at gpt-4o-mini's prices: ~190 fit the cap
LEASE_SECONDS = 6


@pytest.fixture
def stack(control_plane, api_client, crds, tmp_path: Path) -> Iterator[Stack]:
    args = ("--lease-seconds", str(LEASE_SECONDS))
    with running_stack(control_plane, api_client, tmp_path, *args) as running:
        running.upstream.latency = 0.5  # every call of a round is in flight at once
        yield running


def verbose(stack: Stack, calls: int) -> None:
    """The next ``calls`` answers run to their max_tokens (the most a provider bills)."""
    stack.upstream.script(MODEL, *["verbose"] * calls)


def call(agent: openai.OpenAI, n: int) -> str:
    try:
        agent.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"question {n:05d}"}],
            max_tokens=MAX_TOKENS,
        )
    except openai.RateLimitError as refusal:
        return str(refusal.body.get("code") if isinstance(refusal.body, dict) else refusal)
    return "ok"


def rounds(agents: list[openai.OpenAI], stack: Stack) -> list[str]:
    """Rounds of CALLS concurrent calls over the replicas until a round admits none."""
    outcomes: list[str] = []
    with ThreadPoolExecutor(CALLS) as pool:
        for first in range(0, 20 * CALLS, CALLS):
            verbose(stack, CALLS)
            answered = list(
                pool.map(lambda n: call(agents[n % len(agents)], n), range(first, first + CALLS))
            )
            outcomes += answered
            assert upstream_cost(stack.upstream) <= CAP, "the cap was passed"
            if "ok" not in answered:
                return outcomes
    raise AssertionError("calls were still admitted after 20 rounds")


def holders(stack: Stack, namespace: str) -> list[dict[str, str]]:
    return (stack.status(namespace, "budget").get("leases") or {}).get("holders") or []


def test_three_replicas_never_spend_past_the_cap(stack: Stack, namespace: str) -> None:
    team = stack.team(namespace, "budget", str(CAP))
    stack.create(namespace, job_manifest("agent", "budget"))
    replicas: list[Gateway] = [
        stack.gateway,
        stack.gateway.replica("r2"),
        stack.gateway.replica("r3"),
    ]
    key = stack.gateway.add_key(team, namespace, "agent")
    for replica in replicas[1:]:
        replica.keys.update(stack.gateway.keys)
        replica.write_keys()
    for replica in replicas:
        wait_for(lambda r=replica: r._knows(key), timeout=30, what="replica serving the team")
    agents = [replica.client(key) for replica in replicas]
    try:
        outcomes = rounds(agents, stack)
    finally:
        for replica in replicas[1:]:
            replica.stop()

    billed = upstream_cost(stack.upstream)
    assert billed <= CAP
    assert outcomes.count("ok") == len(stack.upstream.calls)
    assert "budget_reservation_failed" in outcomes
    assert set(outcomes) <= {"ok", "budget_reservation_failed", "hard_cap_reached"}
    # Every billed call reached the operator once.
    wait_for(
        lambda: Decimal(stack.status(namespace, "budget").get("spentExactUSD") or 0) == billed,
        timeout=30, what=f"status spend {billed}",
    )  # fmt: skip
    leases = stack.status(namespace, "budget")["leases"]
    assert len(leases["holders"]) >= 2, leases  # the replicas each held a share
    assert billed + Decimal(leases["leasedUSD"]) <= CAP
    print(
        f"3 replicas: {len(outcomes)} calls, {outcomes.count('ok')} admitted, billed "
        f"{billed} of the {CAP} USD cap, {len(leases['holders'])} leases outstanding "
        f"({leases['leasedUSD']} USD)"
    )


def test_a_killed_replicas_lease_is_reclaimed_after_it_lapses(stack: Stack, namespace: str) -> None:
    team = stack.team(namespace, "budget", str(CAP))
    stack.create(namespace, job_manifest("agent", "budget"))
    doomed = stack.gateway.replica("doomed")
    key = stack.gateway.add_key(team, namespace, "agent")
    doomed.keys.update(stack.gateway.keys)
    doomed.write_keys()
    wait_for(lambda: doomed._knows(key), timeout=30, what="the doomed replica serving")
    wait_for(lambda: stack.gateway._knows(key), timeout=30, what="the survivor serving")
    assert call(doomed.client(key), 1) == "ok"
    wait_for(lambda: len(holders(stack, namespace)) == 1, timeout=15, what="one lease")
    [doomed_lease] = holders(stack, namespace)
    doomed.kill(signal.SIGKILL)

    # The survivor asks; the dead replica's share comes back once it lapses, not before.
    survivor = stack.gateway.client(key)
    assert call(survivor, 2) == "ok"
    wait_for(lambda: len(holders(stack, namespace)) == 2, timeout=15, what="two leases")
    # The survivor renews every third of a lease's life; a renewal reclaims silent holders.
    wait_for(
        lambda: len(holders(stack, namespace)) == 1,
        timeout=LEASE_SECONDS * 4, interval=0.5, what="the dead replica's lease reclaimed",
    )  # fmt: skip
    [left] = holders(stack, namespace)
    assert left["holder"] != doomed_lease["holder"]
    assert upstream_cost(stack.upstream) <= CAP
