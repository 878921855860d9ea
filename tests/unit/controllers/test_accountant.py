"""The accountant against a fake API server: guarded writes, 409 re-read, group commit."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from costwarden.accounting.ledger import Entry
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.controllers.accountant import Accountant, BudgetGoneError
from costwarden.controllers.budgets import BudgetIndex
from costwarden.controllers.ingest import usage_mutation
from costwarden.controllers.rest import ApiError
from costwarden.controllers.world import ObservedWorld

BUDGET = {
    "metadata": {"namespace": "ns", "name": "b", "uid": "u1", "resourceVersion": "10",
                 "generation": 1},
    "spec": {"hardCapUSD": "1"},
    "status": {},
}  # fmt: skip


class FakeApiServer:
    """Stores one TeamBudget; PATCH honours metadata.resourceVersion like the real one."""

    def __init__(self) -> None:
        self.obj = copy.deepcopy(BUDGET)
        self.patches = 0
        self.conflicts = 0

    def someone_else_writes(self, status: dict[str, Any]) -> None:
        self.obj["status"].update(status)
        self._bump()

    def _bump(self) -> None:
        self.obj["metadata"]["resourceVersion"] = str(
            int(self.obj["metadata"]["resourceVersion"]) + 1
        )

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise ApiError(409, "PATCH", path, b"conflict")
        self.patches += 1
        for key, value in body["status"].items():
            if value is None:
                self.obj["status"].pop(key, None)
            else:
                self.obj["status"][key] = value
        self._bump()
        return copy.deepcopy(self.obj)

    async def get(self, path: str, params: Any = None) -> dict[str, Any]:
        return copy.deepcopy(self.obj)


def record(cost: str) -> UsageRecord:
    return UsageRecord(
        time=datetime.now(UTC), team="ns/b", namespace="ns", job="j",
        endpoint=Endpoint.CHAT_COMPLETIONS, served_model="m", usage_reported=True,
        tokens=TokenUsage(input=1), cost_usd=Decimal(cost), outcome=Outcome.OK,
    )  # fmt: skip


def setup() -> tuple[FakeApiServer, Accountant]:
    server = FakeApiServer()
    world = ObservedWorld()
    world.apply("budget", "ADDED", server.obj)
    return server, Accountant(server, BudgetIndex(world))  # type: ignore[arg-type]


def test_a_conflict_is_reread_and_nothing_is_overwritten():
    server, accountant = setup()
    server.someone_else_writes({"phase": "Active", "usedPercent": 0})  # the watch lags

    async def go():
        return await accountant.mutate("ns/b", usage_mutation("gw", [Entry(1, record("0.25"))]))

    _commit, applied = asyncio.run(go())
    assert server.conflicts == 1
    assert server.obj["status"]["phase"] == "Active"  # the other writer's field survived
    assert server.obj["status"]["spentExactUSD"] == "0.25"
    assert len(applied.records) == 1


def test_concurrent_batches_share_one_write_and_count_once_each():
    server, accountant = setup()

    async def go():
        return await asyncio.gather(
            *(
                accountant.mutate("ns/b", usage_mutation(f"gw-{i}", [Entry(1, record("0.1"))]))
                for i in range(5)
            ),
            accountant.mutate("ns/b", usage_mutation("gw-0", [Entry(1, record("0.1"))])),
        )

    results = asyncio.run(go())
    assert server.patches <= 2  # the first write, then everything that queued meanwhile
    assert server.obj["status"]["spentExactUSD"] == "0.5"
    assert results[-1][1].duplicates == 1


def test_crossing_the_cap_is_visible_to_the_commit_hook():
    _server, accountant = setup()
    commits = []
    accountant.on_commit = commits.append
    asyncio.run(accountant.mutate("ns/b", usage_mutation("gw", [Entry(1, record("1"))])))
    assert commits[0].before.phase.value == "Active"
    assert commits[0].after.phase.value == "Exhausted"


def test_unknown_team_is_refused():
    _, accountant = setup()
    with pytest.raises(BudgetGoneError):
        asyncio.run(accountant.mutate("ns/nope", usage_mutation("gw", [])))
