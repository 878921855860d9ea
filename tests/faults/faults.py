"""Helpers of the fault suite: the books against the upstream's bill, the operator's and
the gateway's supervision metrics, and the edit that must reach the gateway ConfigMap."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME
from tests.support.load import Agent
from tests.support.polling import wait_for
from tests.support.stack import GROUP, VERSION, Stack, job_manifest, upstream_cost

BUDGET = "budget"


def start_load(stack: Stack, namespace: str, agents: int = 2) -> list[Agent]:
    team = stack.team(namespace, BUDGET, "100")
    stack.create(namespace, job_manifest("agent", BUDGET))
    started = [Agent(stack.gateway.agent(team, namespace, "agent")) for _ in range(agents)]
    for agent in started:
        agent.start()
    wait_for(lambda: answered(started) >= 20, timeout=60, what="calls flowing")
    return started


def answered(agents: list[Agent]) -> int:
    return sum(a.answered for a in agents)


def failed(agents: list[Agent]) -> int:
    return sum(a.failed for a in agents)


def applied_records(stack: Stack, namespace: str) -> int:
    try:
        return int((stack.status(namespace, BUDGET).get("ingestion") or {}).get("records", 0))
    except Exception:  # the API server may be down or restarting
        return -1


def spent_exact(stack: Stack, namespace: str) -> Decimal:
    return Decimal(stack.status(namespace, BUDGET).get("spentExactUSD") or 0)


def books_match_the_bill(stack: Stack, namespace: str, timeout: float = 90) -> Decimal:
    """Once every call is applied, spend equals the upstream's bill exactly and the
    records equal its calls: nothing lost, nothing counted twice."""
    expected = upstream_cost(stack.upstream)

    def settled() -> bool:
        try:
            return spent_exact(stack, namespace) == expected
        except Exception:
            return False

    wait_for(settled, timeout=timeout, interval=0.5, what=f"status spend == upstream {expected}")
    assert applied_records(stack, namespace) == len(stack.upstream.calls)
    return expected


def edit_reaches_the_gateway_config(stack: Stack, namespace: str, cap: str) -> float:
    """Patch the budget's hardCapUSD (retried while the API server comes back) and wait
    until the operator publishes it in the gateway ConfigMap; returns the seconds taken."""
    started = time.monotonic()
    custom = client.CustomObjectsApi(stack.api_client)

    def patched() -> bool:
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "teambudgets", BUDGET, {"spec": {"hardCapUSD": cap}}
            )
        except Exception:
            return False
        return True

    wait_for(patched, timeout=60, interval=0.5, what="the budget edit accepted")
    team = f"{namespace}/{BUDGET}"
    try:
        wait_for(
            lambda: published_cap(stack, team) == Decimal(cap),
            timeout=90, interval=0.5, what=f"hardCapUSD {cap} in the gateway ConfigMap",
        )  # fmt: skip
    except AssertionError as failure:
        state = "alive" if stack.operator.alive else "EXITED"
        logs = stack.operator.logs(tail=60)
        raise AssertionError(f"{failure}\noperator {state}:\n{logs}") from failure
    return time.monotonic() - started


def published_cap(stack: Stack, team: str) -> Decimal | None:
    try:
        cm = client.CoreV1Api(stack.api_client).read_namespaced_config_map(
            CONFIG_MAP_NAME, "costwarden-system"
        )
    except Exception:
        return None
    for entry in json.loads((cm.data or {}).get(CONFIG_MAP_KEY, "{}")).get("teams", []):
        if entry["id"] == team:
            return Decimal(str(entry["hardCapUSD"]))
    return None


def scrape(port: int) -> dict[str, float]:
    """The ``costwarden_*_task_*`` series of a /metrics page, by series text."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("costwarden_") and "_task_" in line:
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def restarts(series: dict[str, float]) -> dict[str, int]:
    return {
        key.split('task="', 1)[1].split('"', 1)[0]: int(value)
        for key, value in series.items()
        if "_task_restarts_total{" in key
    }


def failing(series: dict[str, float]) -> list[str]:
    return [key for key, value in series.items() if "_task_failing{" in key and value]


def healthz(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def summary(**figures: Any) -> str:
    return "FAULT-FIGURES " + json.dumps(figures, sort_keys=True, default=str)


@contextlib.contextmanager
def small_volume(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (an emptyDir with a sizeLimit, or a small disk),
    unmounted afterwards; skips the test where mounting is not permitted (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs for the ledger: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process that still holds a file there does not keep the mount alive.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(volume: Path, leave: int) -> Path:
    """Fill ``volume`` with a file of zeros until it is full, then free ``leave`` bytes:
    another writer on the same volume (logs, /tmp) that took nearly all of it."""
    filler = volume / "filler"
    chunk = bytes(64 * 1024)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while os.write(fd, chunk):
            pass
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler
