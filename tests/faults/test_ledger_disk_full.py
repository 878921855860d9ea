"""The gateway's ledger volume fills up under load (a 1 MiB tmpfs that another writer
nearly filled). While the operator acknowledges, the gateway makes room itself (a ledger
whose every entry is acknowledged is cut in place) and keeps serving. With the operator
down, nothing can be removed: calls are refused with 503 ledger_full naming the OS error,
none is served unmetered, and once space frees the gateway writes what it kept in memory
and serves again. At the end spend equals the upstream's bill exactly."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from tests.faults.faults import (
    answered,
    books_match_the_bill,
    fill,
    small_volume,
    start_load,
    summary,
)
from tests.support.polling import wait_for
from tests.support.stack import Stack

ROOM = 64 * 1024
"""What the other writer leaves of the volume: room for about 90 usage entries."""


def _refusal(probe: openai.OpenAI) -> openai.APIStatusError | None:
    """One call: the refusal it gets, or None if it was served."""
    try:
        probe.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "probe"}]
        )
    except openai.APIStatusError as refused:
        return refused
    return None


def _ledger_full(probe: openai.OpenAI) -> openai.APIStatusError | None:
    refused = _refusal(probe)
    return refused if refused is not None and refused.status_code == 503 else None


def test_ledger_volume_full_refuses_calls_loses_nothing_and_resumes(
    stack: Stack, namespace: str, tmp_path: Path
):
    with small_volume(tmp_path / "ledger-volume") as volume:
        stack.gateway.stop()
        stack.gateway.ledger_dir = volume
        filler = fill(volume, leave=ROOM)
        stack.gateway.start()
        agents = start_load(stack, namespace)
        probe = stack.gateway.agent(f"{namespace}/budget", namespace, "probe")
        started = time.monotonic()

        # The operator acknowledges: each time the ledger fills the volume, the gateway cuts
        # its acknowledged entries in place and goes on.
        wait_for(lambda: "cut to its header in place" in stack.gateway.logs(),
                 timeout=60, interval=0.2, what="the volume full, room made")  # fmt: skip
        calls_before = answered(agents)
        wait_for(lambda: answered(agents) >= calls_before + 100, timeout=60, interval=0.2,
                 what="calls served after the ledger made room")  # fmt: skip

        # The operator down: nothing acknowledged, nothing to remove, the volume fills up.
        stack.operator.stop()
        refused = wait_for(lambda: _ledger_full(probe), timeout=60, interval=0.2,
                           what="503 ledger_full")  # fmt: skip
        assert refused.body is not None
        error = refused.body if isinstance(refused.body, dict) else {}
        assert error.get("code") == "ledger_full", refused.body
        assert "No space left on device" in str(error.get("message")), refused.body
        # While full, no call is made (none served unmetered): at most the calls that were
        # in flight when the volume filled complete.
        frozen = answered(agents)
        held_for = time.monotonic()
        wait_for(lambda: time.monotonic() - held_for >= 2, timeout=5, interval=0.5,
                 what="2 s of a full ledger volume")  # fmt: skip
        assert answered(agents) - frozen <= len(agents), "calls were served while full"
        assert _ledger_full(probe) is not None

        # Space frees (the other writer's file removed): the gateway writes what it kept
        # in memory and serves again, with the operator still down.
        filler.unlink()
        frozen = answered(agents)
        wait_for(lambda: answered(agents) >= frozen + 50, timeout=30, interval=0.2,
                 what="calls served again once space freed")  # fmt: skip
        assert _refusal(probe) is None

        stack.operator.start()
        for agent in agents:
            agent.finish()
        spent = books_match_the_bill(stack, namespace, timeout=120)
        print(summary(
            fault="ledger volume full (1 MiB tmpfs)", calls=len(stack.upstream.calls),
            answered=answered(agents), refused_calls_retried=sum(a.failed for a in agents),
            cuts_in_place=stack.gateway.logs().count("cut to its header in place"),
            spent=spent, seconds=round(time.monotonic() - started),
        ))  # fmt: skip
        stack.gateway.stop()  # before the volume goes away
