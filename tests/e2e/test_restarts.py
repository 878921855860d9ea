"""Nothing lost, nothing counted twice: the operator killed mid-stream, the gateway killed
mid-stream, and a batch delivered again after an operator restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import httpx

from tests.support.load import Agent
from tests.support.polling import wait_for
from tests.support.stack import Stack, job_manifest, upstream_cost


def spent_exact(stack: Stack, namespace: str) -> Decimal:
    return Decimal(stack.status(namespace, "budget").get("spentExactUSD") or 0)


def converges(stack: Stack, namespace: str) -> Decimal:
    expected = upstream_cost(stack.upstream)
    wait_for(
        lambda: spent_exact(stack, namespace) == expected,
        timeout=30, what=f"status spend == upstream {expected}",
    )  # fmt: skip
    return expected


def test_operator_killed_mid_stream_loses_and_double_counts_nothing(stack: Stack, namespace: str):
    team = stack.team(namespace, "budget", "100")
    stack.create(namespace, job_manifest("agent", "budget"))
    agent = Agent(stack.gateway.agent(team, namespace, "agent"))
    agent.start()
    wait_for(lambda: agent.answered >= 30, timeout=30, what="calls flowing")
    stack.restart_operator()  # SIGKILL, then start again while calls keep flowing
    wait_for(lambda: agent.answered >= 120, timeout=60, what="calls flowing after restart")
    agent.stop.set()
    agent.join(10)
    assert agent.failed == 0  # the gateway never depends on the operator being up
    expected = converges(stack, namespace)
    assert expected > 0
    ingestion = stack.status(namespace, "budget")["ingestion"]
    assert ingestion["records"] == len(stack.upstream.calls)


def test_gateway_killed_mid_stream_resends_its_ledger(stack: Stack, namespace: str):
    team = stack.team(namespace, "budget", "100")
    stack.create(namespace, job_manifest("agent", "budget"))
    agent = Agent(stack.gateway.agent(team, namespace, "agent"))
    agent.start()
    wait_for(lambda: agent.answered >= 40, timeout=30, what="calls flowing")
    # Kill between two calls (a call in flight when a process dies is answered by nobody:
    # the upstream may bill it and no gateway can meter it; docs/accounting.md).
    agent.hold.set()
    agent.idle.wait(10)
    gateway = stack.gateway
    ledger_lines = len(gateway.ledger.read_bytes().splitlines())
    cursor = gateway.ledger.with_name(gateway.ledger.name + ".cursor")
    acked = json.loads(cursor.read_text())["ackedSeq"] if cursor.exists() else 0
    gateway.kill()  # SIGKILL: no flush, no goodbye
    assert ledger_lines == len(stack.upstream.calls)
    assert acked < ledger_lines, "the kill should find records not yet acknowledged"
    gateway.start()  # same ledger: re-sends what was not acknowledged
    agent.hold.clear()
    wait_for(lambda: agent.answered >= 120, timeout=60, what="calls flowing after restart")
    agent.stop.set()
    agent.join(10)
    converges(stack, namespace)
    assert stack.status(namespace, "budget")["ingestion"]["records"] == len(stack.upstream.calls)


def test_a_batch_delivered_again_after_an_operator_restart_is_counted_once(
    stack: Stack, namespace: str
):
    team = stack.team(namespace, "budget", "100")
    url, ingest = stack.ingest_url, stack.ingest_client()
    headers = {"Authorization": f"Bearer {stack.token_file.read_text().strip()}"}
    now = datetime.now(UTC).isoformat()
    batch = {
        "source": "replayer",
        "items": [
            {"seq": seq, "record": {
                "time": now, "team": team, "namespace": namespace, "job": "j", "caller": "key",
                "endpoint": "chat.completions", "servedModel": "gpt-4o-mini",
                "tokens": {"input": 10, "output": 5}, "usageReported": True,
                "costUSD": "0.0000045", "outcome": "OK",
            }}
            for seq in (1, 2, 3)
        ],
    }  # fmt: skip
    first = ingest.post(url, json=batch, headers=headers, timeout=10).json()
    assert first["ackedSeq"] == 3
    assert first["records"] == 3
    stack.restart_operator()
    wait_for(
        lambda: _post(ingest, url, batch, headers), timeout=60, what="ingestion back after restart"
    )
    again = ingest.post(url, json=batch, headers=headers, timeout=10).json()
    assert again["duplicates"] == 3
    assert again["records"] == 0
    status = stack.status(namespace, "budget")
    assert status["spentExactUSD"] == "0.0000135"
    assert status["ingestion"]["duplicates"] >= 3


def _post(ingest: httpx.Client, url: str, batch: dict, headers: dict) -> bool:
    try:
        return ingest.post(url, json=batch, headers=headers, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
