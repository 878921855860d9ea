"""gateway/leases.py: what a replica may reserve of its lease, and how it asks for more.

The operator is an in-memory stand-in here (a function answering POSTs); the real
exchange runs in tests/integration/test_gateway_leases.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from costwarden.gateway.leases import Leases
from costwarden.policy.leases import LEASE_SECONDS

D = Decimal
NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
TEAM = "ns/budget"


class Operator:
    def __init__(self, amount: str = "1", seq: int = 0, **extra: object) -> None:
        self.amount, self.seq, self.extra = amount, seq, extra
        self.asked: list[dict[str, object]] = []
        self.status = 200
        self.gate: asyncio.Event | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert path == "/v1/leases"
        self.asked.append(orjson.loads(body)["teams"][0])
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return self.status, b'{"error":{"code":"not_leader"}}'
        answer = {"team": TEAM, "leasedUSD": self.amount, "appliedSeq": self.seq,
                  "periodStart": "2026-11-01T00:00:00Z", **self.extra}  # fmt: skip
        return 200, orjson.dumps({"teams": [answer]})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """The test, run to completion on a fresh event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def sync(*args: object, **kwargs: object) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]

    return sync


def leases(operator: Operator, held: str = "0", clock: Clock | None = None) -> Leases:
    return Leases(operator.post, lambda: "gw-1/abc", lambda team: D(held), clock or Clock())


@run
async def test_nothing_is_available_before_the_operator_lends_anything():
    lent = leases(Operator())
    assert lent.available(TEAM) == 0


@run
async def test_available_is_the_lease_net_of_unapplied_usage_and_calls_in_flight():
    operator = Operator("1", seq=3)
    lent = leases(operator, held="0.2")
    answer = await lent.ask(TEAM, D("0.1"), D("0.1"))
    assert answer.granted
    lent.note(TEAM, 3, D("0.05"), NOW)  # already applied when the operator answered
    lent.note(TEAM, 4, D("0.3"), NOW)
    assert lent.available(TEAM) == D("0.5")  # 1 - 0.3 pending - 0.2 held
    asked = operator.asked[0]
    assert asked["need"] == "0.1"
    assert asked["inUse"] == "0.2"


@run
async def test_an_answer_trims_what_the_operator_has_applied_since():
    operator = Operator("1", seq=0)
    lent = leases(operator)
    await lent.ask(TEAM, D("0.1"), D("0.1"))
    lent.note(TEAM, 1, D("0.3"), NOW)
    lent.note(TEAM, 2, D("0.2"), NOW)
    operator.amount, operator.seq = "0.7", 1  # entry 1 drawn from the lease
    await lent.ask(TEAM, D("0.9"), D("0.1"))
    assert lent.available(TEAM) == D("0.5")  # 0.7 - 0.2 (entry 2 still pending)
    assert operator.asked[1]["unapplied"] == "0.5"


@run
async def test_concurrent_calls_share_one_request():
    operator = Operator("5")
    operator.gate = asyncio.Event()
    lent = leases(operator)
    waiting = [asyncio.create_task(lent.ask(TEAM, D("0.1"), D("0.1"))) for _ in range(20)]
    await asyncio.sleep(0)
    operator.gate.set()
    answers = await asyncio.gather(*waiting)
    assert all(a.granted for a in answers)
    assert len(operator.asked) == 1


@run
async def test_a_refusal_says_whether_the_cap_is_reached():
    operator = Operator("0.01", final=True, message="the hard cap is reached: ...")
    lent = leases(operator)
    answer = await lent.ask(TEAM, D("0.1"), D("0.1"))
    assert not answer.granted
    assert answer.final
    assert "hard cap" in answer.message


@pytest.mark.parametrize(
    "reply",
    [b"not json", b"[]", b'{"teams": [{"team": "ns/budget", "leasedUSD": "-1"}]}',
     b'{"teams": [{"team": "ns/budget", "leasedUSD": "NaN"}]}', b'{"teams": []}'],
)  # fmt: skip
@run
async def test_a_malformed_answer_lends_nothing(reply: bytes):
    async def post(path: str, body: bytes) -> tuple[int, bytes]:
        return 200, reply

    lent = Leases(post, lambda: "gw", lambda team: D(0))
    answer = await lent.ask(TEAM, D("0.1"), D("0.1"))
    assert not answer.granted
    assert not answer.final
    assert lent.available(TEAM) == 0


@run
async def test_an_unreachable_operator_lends_nothing_and_a_lease_lapses():
    operator = Operator("1")
    clock = Clock()
    lent = leases(operator, clock=clock)
    await lent.ask(TEAM, D("0.1"), D("0.1"))

    async def down(path: str, body: bytes) -> tuple[int, bytes]:
        raise OSError("connection refused")

    lent._post = down
    answer = await lent.ask(TEAM, D("2"), D("2"))
    assert not answer.granted
    assert lent.available(TEAM) == D(1)  # the lease still holds until it lapses
    clock.now += LEASE_SECONDS
    assert lent.available(TEAM) == 0


@run
async def test_an_operator_that_cannot_decide_keeps_the_lease_good():
    operator = Operator("1")
    clock = Clock()
    lent = leases(operator, clock=clock)
    await lent.ask(TEAM, D("0.1"), D("0.1"))
    operator.status = 503
    for _ in range(4):
        clock.now += LEASE_SECONDS / 2
        await lent.ask(TEAM, D("2"), D("2"))
    assert lent.available(TEAM) == D(1)


@run
async def test_restored_usage_counts_until_applied():
    operator = Operator("1", seq=4)
    lent = leases(operator)
    lent.restore([(TEAM, 4, D("0.25"), NOW), (TEAM, 5, D("0.25"), NOW)])
    await lent.ask(TEAM, D("0.1"), D("0.1"))
    assert lent.available(TEAM) == D("0.75")


@run
async def test_usage_of_an_earlier_period_is_not_pending_in_the_new_one():
    operator = Operator("1")
    lent = leases(operator)
    lent.restore([(TEAM, 1, D("0.25"), datetime(2026, 10, 31, 23, tzinfo=UTC))])
    await lent.ask(TEAM, D("0.1"), D("0.1"))
    assert lent.available(TEAM) == D(1)
