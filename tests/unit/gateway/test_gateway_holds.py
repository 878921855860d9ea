"""The hold journal (gateway/holds.py): a reserved call is written down before it is
forwarded; a call a killed gateway left in flight is charged at its reservation when the
gateway starts again, exactly once, and never when its own record reached the ledger."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.gateway.call import Call
from costwarden.gateway.holds import (
    INTERRUPTED_REASON,
    HoldJournal,
    charge_at_reservation,
    journal_path,
    segments,
)
from costwarden.gateway.identity import Caller
from costwarden.gateway.metrics import GatewayMetrics
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.reservations import Reservations
from costwarden.gateway.sinks import FsyncPolicy, JsonlLedgerSink, MemorySink
from costwarden.policy import reservation as reserve
from costwarden.policy.pricing import call_cost
from costwarden.testing.gateway import (
    CLAUDE_PRICING,
    NAMESPACE,
    TEAM_ID,
    GatewayThread,
    model,
    sample_config,
)
from costwarden.testing.upstream import FakeUpstream

from .conftest import CHAT, StartGateway, wait_for

TEAM = sample_config("http://x").teams[0]
ROUTES = (model("gpt-4o", "http://x"), model("gpt-4o-mini", "http://x"))


def held_call(
    routes: tuple[ModelRoute, ...] = ROUTES, prompt: int = 120, ceiling: int = 1000
) -> Call:
    """A call past reservation, as gateway/proxy.py leaves it before forwarding."""
    call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
    call.caller = Caller("sidecar", NAMESPACE, "agent-1-x", "agent-1")
    call.team = TEAM
    call.policy_id = TEAM.routing_policy or ""
    call.requested_model = "gpt-4o"
    call.rule = "code-review"
    call.revision = "rev-1"
    call.task, call.sensitivity, call.reason = "code-review", "Internal", "rule code-review"
    worst = reserve.worst_case(prompt, ceiling, routes)
    call.reservation = Reservations().hold(TEAM, "agent-1", worst, routes)
    return call


def journal(ledger: Path, **kw: Any) -> HoldJournal:
    return HoldJournal(journal_path(ledger), replica_id="gw-1", fsync=FsyncPolicy.NONE, **kw)


def started(ledger: Path, sink: Any = None, metrics: GatewayMetrics | None = None) -> HoldJournal:
    """A journal as a starting gateway opens it: recovery first."""
    j = journal(ledger)
    j.recover(sink if sink is not None else MemorySink(), ledger, metrics)
    return j


def journal_bytes(ledger: Path) -> bytes:
    return b"".join(path.read_bytes() for path in segments(journal_path(ledger)))


def ledger_ids(ledger: Path) -> list[str]:
    return [orjson.loads(line)["id"] for line in ledger.read_bytes().splitlines() if line]


def test_an_unsettled_hold_is_charged_at_its_reservation_on_recovery(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    first = started(ledger)
    call = held_call()
    assert first.hold(call, ROUTES)
    # kill -9: the process is gone, nothing settles; a new process starts on the same files.
    sink, metrics = MemorySink(), GatewayMetrics()

    charged = journal(ledger).recover(sink, ledger, metrics)

    worst = call.reservation.worst  # type: ignore[union-attr]
    assert charged == sink.records
    assert len(charged) == 1
    record = charged[0]
    assert record.id == call.id
    assert record.time == call.arrived
    assert (record.team, record.namespace, record.job, record.pod) == (
        TEAM_ID, NAMESPACE, "agent-1", "agent-1-x",
    )  # fmt: skip
    assert record.cost_usd == worst.cost  # exactly the reservation
    assert record.served_model == "gpt-4o"  # the dearest candidate: what was reserved
    assert call_cost(record.tokens, ROUTES[0].pricing) == worst.cost  # what the operator recomputes
    assert record.tokens.total() == worst.tokens == 1120
    assert record.usage_reported
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert record.reason == INTERRUPTED_REASON
    assert record.reason.endswith("charged_reservation")
    assert record.http_status == 0
    assert (record.task, record.sensitivity, record.route_reason) == (
        "code-review", "Internal", "rule code-review",
    )  # fmt: skip
    assert record.gateway_replica == "gw-1"
    assert metrics.interrupted_calls.labels(TEAM_ID)._value.get() == 1
    # The journal starts empty: a second restart charges nothing more.
    assert journal_bytes(ledger) == b""
    assert len(segments(journal_path(ledger))) == 1
    assert journal(ledger).recover(MemorySink(), ledger) == []


def test_a_settled_hold_is_not_charged(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    done, open_ = held_call(), held_call()
    assert j.hold(done, ROUTES)
    assert j.hold(open_, ROUTES)
    j.settled(done.id)
    assert j.in_flight == 1

    charged = journal(ledger).recover(MemorySink(), ledger)

    assert [r.id for r in charged] == [open_.id]


def test_a_hold_whose_record_reached_the_ledger_is_not_charged_again(tmp_path: Path) -> None:
    """Killed between the record's ledger line and the settlement line: the record is the
    charge, the hold is not charged on top of it."""
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    call = held_call()
    assert j.hold(call, ROUTES)
    sink = JsonlLedgerSink(ledger, FsyncPolicy.NONE)
    call.tokens = reserve.charged_tokens(reserve.WorstCase(9, 3, Decimal(0)))
    call.outcome, call.status = Outcome.OK, 200
    sink.emit(call.to_record("gw-1"))  # ... and the kill comes before settled()

    charged = journal(ledger).recover(MemorySink(), ledger)

    assert charged == []
    assert ledger_ids(ledger) == [call.id]


def test_a_restart_during_recovery_does_not_charge_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    calls = [held_call() for _ in range(3)]
    for call in calls:
        assert j.hold(call, ROUTES)

    def killed(self: HoldJournal, *args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed after the charges were written, before the journal reset")

    with monkeypatch.context() as patch:
        patch.setattr(HoldJournal, "_start_segment", killed)
        with pytest.raises(SystemExit):
            journal(ledger).recover(JsonlLedgerSink(ledger, FsyncPolicy.NONE), ledger)
    assert sorted(ledger_ids(ledger)) == sorted(c.id for c in calls)

    again = journal(ledger).recover(JsonlLedgerSink(ledger, FsyncPolicy.NONE), ledger)

    assert again == []
    assert sorted(ledger_ids(ledger)) == sorted(c.id for c in calls)  # each charged once


def test_a_torn_last_line_is_skipped_and_the_journal_stays_usable(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    whole, torn = held_call(), held_call()
    assert j.hold(whole, ROUTES)
    assert j.hold(torn, ROUTES)
    path = j.current
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a node crash cut the last line short

    recovered = journal(ledger)
    charged = recovered.recover(MemorySink(), ledger)

    # The torn hold is lost with the page cache that held it (a node crash, never a kill).
    assert [r.id for r in charged] == [whole.id]
    later = held_call()
    assert recovered.hold(later, ROUTES)
    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [later.id]


def test_an_unreadable_hold_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    good = held_call()
    assert j.hold(good, ROUTES)
    with j.current.open("ab") as file:
        file.write(b'{"kind":"Hold","record":{"id":"x"}}\nnot json\n')

    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [good.id]


def test_compaction_keeps_only_the_calls_in_flight(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    j = journal(ledger, compact_bytes=8192)
    j.recover(MemorySink(), ledger)
    long_running = held_call()
    assert j.hold(long_running, ROUTES)
    line = len(journal_bytes(ledger))
    largest = 0
    for _ in range(500):
        call = held_call()
        assert j.hold(call, ROUTES)
        j.settled(call.id)
        largest = max(largest, len(journal_bytes(ledger)))

    assert j.compactions >= 10
    assert largest < 8192 + 2 * line  # bounded: the threshold plus a hold and its settlement
    assert j.in_flight == 1
    assert len(segments(journal_path(ledger))) == 1  # old segments unlinked
    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [long_running.id]


def test_the_charge_prices_to_the_reservation_whichever_input_rate_is_dearest() -> None:
    """The operator recomputes a record's cost from its tokens and the served model's
    prices: the charge must be the reservation under that recomputation too."""
    claude = (model("claude-sonnet", "http://x", pricing=CLAUDE_PRICING),)  # writes 3.75 > 3
    worst = reserve.worst_case(1000, 50, claude)
    route, tokens = charge_at_reservation(worst, claude)
    assert (tokens.input, tokens.cache_creation, tokens.output) == (0, 1000, 50)
    assert call_cost(tokens, route.pricing) == worst.cost

    worst = reserve.worst_case(1000, 50, (ROUTES[1], ROUTES[0]))  # the dearer one second
    held = Reservations().hold(TEAM, "job", worst, (ROUTES[1], ROUTES[0]))
    assert charge_at_reservation(worst, (ROUTES[1], ROUTES[0]), held.models)[0] is ROUTES[0]
    route, tokens = charge_at_reservation(worst, (ROUTES[1], ROUTES[0]))
    assert route.name == "gpt-4o"
    assert tokens.input == 1000
    assert call_cost(tokens, route.pricing) == worst.cost


def test_an_interrupted_record_passes_the_operators_recomputation(tmp_path: Path) -> None:
    """The record the journal charges is one the operator's ingestion accepts as is (its
    cost is the served model's price of its tokens), claude's cache-write rate included."""
    from datetime import UTC, datetime

    from costwarden.accounting.trust import Check, PodFacts, Reporter, check_record, current_prices

    config = sample_config("http://x")
    claude = next(m for m in config.policies[0].models if m.name == "claude-sonnet")
    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    assert j.hold(held_call(), ROUTES)
    assert j.hold(held_call((claude,)), (claude,))
    reporter = Reporter("pod:team-a/agent-1-x/uid-1", NAMESPACE, "agent-1-x", "uid-1")
    pod = PodFacts(NAMESPACE, "agent-1-x", "uid-1", {}, job="agent-1")
    check = Check(reporter, config, datetime.now(UTC), current_prices(config), pod)

    charged = journal(ledger).recover(MemorySink(), ledger)

    assert len(charged) == 2
    for record in charged:
        checked = check_record(1, record, check)
        assert checked.refusal is None, checked.message
        assert checked.record is not None
        assert checked.record.cost_usd == record.cost_usd


# -- in the gateway --------------------------------------------------------------------------


def test_the_gateway_writes_the_hold_before_forwarding_and_settles_it_after(
    start_gateway: StartGateway, fake: FakeUpstream, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    gateway = start_gateway(sink=JsonlLedgerSink(ledger, FsyncPolicy.NONE))
    holds = started(ledger)
    gateway.gateway.holds = holds
    fake.latency = 2.0  # the call stays upstream while the journal is read
    answers: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: answers.append(
            httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=60)
        ),
        daemon=True,
    )
    caller.start()

    wait_for(lambda: holds.in_flight == 1, what="the call held in the journal")
    (line,) = journal_bytes(ledger).splitlines()
    hold = orjson.loads(line)
    assert hold["kind"] == "Hold"
    assert hold["record"]["team"] == TEAM_ID
    held = gateway.gateway.reservations.team(TEAM_ID).cost
    assert Decimal(hold["reservedUSD"]) == held  # the journal holds what the caps count
    assert not ledger.exists() or ledger.read_bytes() == b""  # no record yet: still in flight

    caller.join(60)
    assert answers
    assert answers[0].status_code == 200
    wait_for(lambda: holds.in_flight == 0, what="the hold settled")
    kinds = [orjson.loads(x)["kind"] for x in journal_bytes(ledger).splitlines()]
    assert kinds == ["Hold", "Settled"]
    (record,) = [UsageRecord.model_validate_json(x) for x in ledger.read_bytes().splitlines()]
    assert record.id == hold["record"]["id"]
    assert record.outcome is Outcome.OK
    assert journal(ledger).recover(MemorySink(), ledger) == []  # nothing to charge


def test_a_call_whose_hold_cannot_be_written_is_refused_and_not_sent(
    start_gateway: StartGateway, fake: FakeUpstream, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    gateway: GatewayThread = start_gateway()
    holds = started(ledger)
    gateway.gateway.holds = holds
    import os

    os.close(holds._fd)  # type: ignore[arg-type]  # the volume went away under it
    holds._fd = os.open(tmp_path, os.O_RDONLY)  # writes now fail (EBADF)

    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "ledger_full"
    assert fake.calls == []  # never forwarded: nobody could have charged it
    wait_for(lambda: gateway.gateway.reservations.in_flight == 0, what="hold released")


def test_a_settlement_that_cannot_be_written_still_settles_the_hold(tmp_path: Path) -> None:
    """The settlement line fails (the volume hiccups): the hold must not come back as an
    interruption later, even once its record has been rotated out of the ledger."""
    import os

    ledger = tmp_path / "ledger.jsonl"
    j = started(ledger)
    done, open_ = held_call(), held_call()
    assert j.hold(done, ROUTES)
    assert j.hold(open_, ROUTES)
    broken = j._fd
    j._fd = os.open(tmp_path, os.O_RDONLY)  # the next write fails (EBADF)
    os.close(broken)  # type: ignore[arg-type]

    j.settled(done.id)  # not written: a new segment holds only what is still in flight

    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [open_.id]


class RefusingVolumeSink(MemorySink):
    """A ledger sink whose volume refuses writes: lines kept in its memory (``unwritten``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unwritten = 0
        self.refusing = False

    def emit(self, record: UsageRecord) -> None:
        super().emit(record)
        if self.refusing or self.unwritten:
            self.unwritten += 1  # in order: once one line waits, every later one does


def test_a_call_settled_while_its_record_waits_in_memory_stays_held(tmp_path: Path) -> None:
    """The ledger's volume refuses writes and the sink keeps the record in memory: a kill
    then loses that memory, so the hold must stay open until the record is in the file."""
    ledger = tmp_path / "ledger.jsonl"
    sink = RefusingVolumeSink()
    j = journal(ledger)
    j.recover(sink, ledger)
    waiting, later = held_call(), held_call()
    assert j.hold(waiting, ROUTES)
    assert j.hold(later, ROUTES)
    sink.unwritten = 1  # the record of `waiting` is only in the sink's memory

    j.settled(waiting.id)

    assert j.deferred == 1
    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [waiting.id, later.id]


def test_deferred_settlements_complete_once_the_sink_has_written_its_lines(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    sink = RefusingVolumeSink()
    j = journal(ledger)
    j.recover(sink, ledger)
    first, second = held_call(), held_call()
    assert j.hold(first, ROUTES)
    assert j.hold(second, ROUTES)
    sink.unwritten = 1
    j.settled(first.id)
    sink.unwritten = 0  # the volume took the lines again

    j.settled(second.id)

    assert j.deferred == 0
    assert j.in_flight == 0
    assert journal(ledger).recover(MemorySink(), ledger) == []


def test_charges_the_ledger_cannot_take_at_recovery_stay_held(tmp_path: Path) -> None:
    """Recovery's own charges kept in the sink's memory (volume refusing): the holds are
    carried into the new segment, so a kill before the volume recovers charges them then
    (the ledger never got them), and a later settlement drops them."""
    ledger = tmp_path / "ledger.jsonl"
    first = started(ledger)
    call = held_call()
    assert first.hold(call, ROUTES)
    sink = RefusingVolumeSink()
    sink.refusing = True

    second = journal(ledger)
    charged = second.recover(sink, ledger)

    assert [r.id for r in charged] == [call.id]
    assert second.deferred == 1
    assert [r.id for r in journal(ledger).recover(MemorySink(), ledger)] == [call.id]


def test_recovered_charges_are_settled_when_the_sink_drains(tmp_path: Path) -> None:
    import asyncio

    ledger = tmp_path / "ledger.jsonl"
    first = started(ledger)
    assert first.hold(held_call(), ROUTES)
    sink = RefusingVolumeSink()
    sink.refusing = True
    second = journal(ledger)
    second.recover(sink, ledger)

    async def drain() -> None:
        sink.unwritten = 0
        second._ensure_task()
        for _ in range(200):
            if not second.deferred:
                break
            await asyncio.sleep(0.02)
        await second.close()

    asyncio.run(drain())
    assert second.deferred == 0
    assert journal(ledger).recover(MemorySink(), ledger) == []
