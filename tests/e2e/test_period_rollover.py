"""Period rollover with an injected clock: the operator runs `--clock-offset` seconds ahead,
so its day (in the budget's time zone) ends a few seconds into the test. At the boundary
spend resets, the closed period is kept in history, and the Job suspended for that
period's cap is resumed, annotated PeriodRolledOver."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import openai
from kubernetes import client

from costwarden.api.teambudget import BudgetPeriod, BudgetPhase
from costwarden.policy.periods import period_bounds
from tests.support.polling import wait_for
from tests.support.stack import job_manifest, running_stack, upstream_cost

LEAD = timedelta(seconds=25)
"""How far before its day's end the operator's clock starts: time to cross the cap."""


def clock_offset(time_zone: str) -> tuple[float, datetime]:
    """Seconds to add to real time so the operator starts LEAD before the end of the day in
    ``time_zone``; and that boundary (in the operator's time)."""
    real = datetime.now(UTC)
    _, boundary = period_bounds(BudgetPeriod.DAILY, time_zone, real)
    offset = boundary - LEAD - real
    return offset.total_seconds(), boundary


def pick_time_zone() -> str:
    """A zone whose midnight is not about to happen in real time (the offset is then >= 0)."""
    for zone in ("Asia/Kolkata", "America/New_York", "Australia/Adelaide"):
        if clock_offset(zone)[0] > 60:
            return zone
    raise AssertionError("no zone far enough from midnight")  # three zones cannot all be


def test_rollover_resets_spend_keeps_history_and_resumes_the_job(
    control_plane, api_client: client.ApiClient, crds, namespace: str, tmp_path: Path
):
    zone = pick_time_zone()
    offset, boundary = clock_offset(zone)
    with running_stack(control_plane, api_client, tmp_path, "--clock-offset", str(offset)) as stack:
        team = stack.team(
            namespace, "budget", "0.0001", period={"schedule": "Daily", "timeZone": zone}
        )
        # The reconciler writes the first period just after publishing the gateway config.
        status = wait_for(
            lambda: (s := stack.status(namespace, "budget")).get("currentPeriod") and s,
            timeout=30, what="the first period opened",
        )  # fmt: skip
        assert status["currentPeriod"]["end"] == boundary.strftime("%Y-%m-%dT%H:%M:%SZ")
        stack.create(namespace, job_manifest("agent", "budget"))
        agent = stack.gateway.agent(team, namespace, "agent")
        try:
            for n in range(100):
                agent.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"Task {n}."}]
                )
        except openai.RateLimitError:
            pass
        wait_for(lambda: stack.job(namespace, "agent").spec.suspend, timeout=10)
        before = upstream_cost(stack.upstream)
        closed_start = status["currentPeriod"]["start"]

        # The operator's clock crosses its midnight in `zone` by itself, LEAD after start.
        rolled = wait_for(
            lambda: (s := stack.status(namespace, "budget"))["currentPeriod"]["start"]
            != closed_start and s,
            timeout=LEAD.total_seconds() + 30, what="the period rolled over",
        )  # fmt: skip
        assert rolled["currentPeriod"]["start"] == boundary.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert rolled["spentUSD"] == "0.00"
        closed = rolled["history"][-1]
        assert closed["start"] == closed_start
        assert Decimal(closed["spentExactUSD"]) == before
        job = wait_for(
            lambda: not (j := stack.job(namespace, "agent")).spec.suspend and j,
            timeout=15, what="Job resumed in the new period",
        )  # fmt: skip
        assert job.metadata.annotations["costwarden.io/resumed-reason"] == "PeriodRolledOver"
        wait_for(
            lambda: stack.status(namespace, "budget").get("phase") == BudgetPhase.ACTIVE,
            timeout=15, what="Active again",
        )  # fmt: skip
        actions = wait_for(
            lambda: len(a := stack.status(namespace, "budget").get("recentActions", [])) >= 2 and a,
            timeout=15, what="the resumption recorded in status.recentActions",
        )  # fmt: skip
        assert [(a["action"], a["reason"]) for a in actions] == [
            ("Suspended", "HardCapReached"),
            ("Resumed", "PeriodRolledOver"),
        ]
