"""kill -9 of the operator and of the gateway, again and again, under load: after every
restart calls flow and usage is applied again, and at the end spend equals the
upstream's bill exactly (nothing lost, nothing counted twice). The quick version (6
restarts) runs in the default suite; the soak (100) with ``make soak``."""

from __future__ import annotations

import time

import pytest

from tests.faults.faults import (
    answered,
    applied_records,
    books_match_the_bill,
    failed,
    healthz,
    restarts,
    scrape,
    start_load,
    summary,
)
from tests.support.load import Agent
from tests.support.polling import wait_for
from tests.support.stack import Stack


def _kill_gateway_between_calls(stack: Stack, agents: list[Agent]) -> None:
    """A call in flight when the gateway dies is charged its reservation after the restart,
    not what the upstream billed (docs/ledger.md; tests/faults/test_kill_in_flight.py), so
    for spend to equal the bill exactly the gateway dies between calls here."""
    for agent in agents:
        agent.hold.set()
    for agent in agents:
        assert agent.idle.wait(15), "an agent did not park"
    stack.gateway.kill()  # SIGKILL
    stack.gateway.start()  # same ledger: re-sends what was not acknowledged
    for agent in agents:
        agent.hold.clear()


def _restarts(stack: Stack, namespace: str, ports: dict[str, int], count: int) -> None:
    agents = start_load(stack, namespace)
    started = time.monotonic()
    kills = {"operator": 0, "gateway": 0}
    for round_ in range(count):
        calls, records = answered(agents), applied_records(stack, namespace)
        if round_ % 2 == 0:
            stack.restart_operator()  # SIGKILL, then started again; calls keep flowing
            kills["operator"] += 1
        else:
            _kill_gateway_between_calls(stack, agents)
            kills["gateway"] += 1
        # Work resumes: calls answered, and usage applied by the (new) active operator.
        wait_for(lambda c=calls: answered(agents) >= c + 10, timeout=60, interval=0.2,
                 what=f"calls flowing after restart {round_ + 1}")  # fmt: skip
        wait_for(lambda r=records: applied_records(stack, namespace) > r, timeout=120,
                 interval=0.5, what=f"usage applied after restart {round_ + 1}")  # fmt: skip
    for agent in agents:
        agent.finish()
    spent = books_match_the_bill(stack, namespace, timeout=120)
    assert stack.operator.alive
    print(summary(
        fault=f"kill -9 x{count}", kills=kills, calls=len(stack.upstream.calls),
        answered=answered(agents), failed_calls_retried=failed(agents), spent=spent,
        seconds=round(time.monotonic() - started), gateway_health=healthz(
            stack.gateway.port), operator_task_restarts=restarts(scrape(ports["metrics"])),
    ))  # fmt: skip


def test_operator_and_gateway_killed_repeatedly_under_load_lose_nothing(
    stack: Stack, namespace: str, ports: dict[str, int]
):
    _restarts(stack, namespace, ports, 6)


@pytest.mark.soak
def test_soak_100_kills_under_load_lose_nothing(
    stack: Stack, namespace: str, ports: dict[str, int]
):
    _restarts(stack, namespace, ports, 100)
