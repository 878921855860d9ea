"""POST /v1/results and /v1/results/github (no API server: a fake accountant, budgets and
TokenReview): who may report, whose books a report changes, and every refusal."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from costwarden.accounting.books import Books
from costwarden.accounting.changes import count_change
from costwarden.accounting.forge import github_signature
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.controllers.results import Results

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
FIXTURES = Path(__file__).parents[2] / "fixtures" / "github"


@dataclass
class Budget:
    id: str
    namespace: str
    spec: TeamBudgetSpec


class Budgets:
    def __init__(self, budgets: list[Budget]) -> None:
        self.budgets = budgets

    def all(self) -> list[Budget]:
        return self.budgets


class Accountant:
    def __init__(self, teams: list[str]) -> None:
        self.writes = 0
        self.books = {t: Books(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
                      for t in teams}  # fmt: skip
        for books in self.books.values():  # every team spent on acme/api#101
            record = UsageRecord(
                time=NOW, endpoint=Endpoint.CHAT_COMPLETIONS, outcome=Outcome.OK,
                usage_reported=True, cost_usd=Decimal("0.5"),
                labels={"repository": "acme/api", "change": "101"},
            )  # fmt: skip
            count_change(books.changes, record)

    def status_of(self, budget: Budget) -> dict[str, Any]:
        return self.books[budget.id].fragment()

    async def mutate(self, team: str, mutation: Any) -> tuple[Any, Any]:
        self.writes += 1
        await asyncio.sleep(0)
        return None, mutation(self.books[team], NOW)

    def merged(self, team: str) -> int:
        return self.books[team].changes.status().by_repository[0].merged.changes


class Leader:
    def __init__(self, leader: bool = True) -> None:
        self.leader = leader

    async def is_leader(self) -> bool:
        return self.leader


class Rest:
    """TokenReview: ``<namespace>.<name>.results`` is a results-audience token of that SA."""

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        namespace, name, audience = body["spec"]["token"].split(".")
        if audience != "results" or body["spec"]["audiences"] != ["costwarden.io/results"]:
            return {"status": {"authenticated": False}}
        user = f"system:serviceaccount:{namespace}:{name}"
        return {"status": {"authenticated": True, "user": {"username": user}}}


def spec(*reporters: dict[str, str]) -> TeamBudgetSpec:
    return TeamBudgetSpec.model_validate(
        {"hardCapUSD": "10", "attribution": {"resultReporters": list(reporters)}}
    )


def run(tmp_path: Path, scenario: Any, leader: bool = True) -> Accountant:
    token_file = tmp_path / "results-token"
    token_file.write_text("admin-token\n")
    secret_file = tmp_path / "webhook"
    secret_file.write_text("old\nhook-secret\n")
    accountant = Accountant(["a/budget", "b/budget"])
    budgets = Budgets([
        Budget("a/budget", "a", spec({"name": "ci"})),
        Budget("b/budget", "b", spec({"name": "ci", "namespace": "a"}, {"name": "ci"})),
    ])  # fmt: skip
    results = Results(accountant, budgets, Leader(leader), Rest(),  # type: ignore[arg-type]
                      token_file=token_file, github_secret_file=secret_file,
                      log_file=tmp_path / "results.jsonl")  # fmt: skip

    async def main() -> None:
        app = web.Application()
        results.routes(app)
        async with TestClient(TestServer(app)) as http:
            await scenario(http)

    asyncio.run(main())
    return accountant


def report(change: str = "101", outcome: str = "merged") -> dict[str, str]:
    return {"repository": "Acme/API", "change": f"#{change}", "outcome": outcome}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_listed_service_account_changes_the_books_of_the_budgets_that_list_it(tmp_path):
    async def scenario(http: TestClient) -> None:
        # b/budget lists a's ci (namespace a) and its own ci; a/budget lists a's ci only.
        answer = await http.post("/v1/results", json=report(), headers=auth("b.ci.results"))
        assert answer.status == 200
        assert (await answer.json())["teams"] == ["b/budget"]
        answer = await http.post("/v1/results", json=report(), headers=auth("a.ci.results"))
        assert (await answer.json())["teams"] == ["a/budget"], "b was already merged"

    accountant = run(tmp_path, scenario)
    assert (accountant.merged("a/budget"), accountant.merged("b/budget")) == (1, 1)
    logged = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(o["repository"], o["change"], o["source"]) for o in logged] == [
        ("acme/api", "101", "sa:b/ci"), ("acme/api", "101", "sa:a/ci"),
    ]  # fmt: skip


def test_refusals(tmp_path):
    async def scenario(http: TestClient) -> None:
        cases = [
            ({}, 401),  # no credential
            (auth("a.ci.gateway"), 401),  # another audience
            (auth("c.ci.results"), 403),  # a service account nobody lists
            (auth("not-a-token"), 401),
        ]
        for headers, status in cases:
            answer = await http.post("/v1/results", json=report(), headers=headers)
            assert answer.status == status, (headers, await answer.text())
        bad = await http.post("/v1/results", json={"change": "1", "outcome": "shipped"},
                              headers=auth("admin-token"))  # fmt: skip
        assert bad.status == 400
        big = await http.post("/v1/results", data=b"{" + b" " * 70_000 + b"}",
                              headers=auth("admin-token"))  # fmt: skip
        assert big.status == 413

    accountant = run(tmp_path, scenario)
    assert (accountant.merged("a/budget"), accountant.merged("b/budget")) == (0, 0)


def test_the_admin_token_and_the_webhook_apply_to_every_team(tmp_path):
    deliveries = json.loads((FIXTURES / "pull_request_deliveries.json").read_text())

    async def scenario(http: TestClient) -> None:
        body = json.dumps(deliveries[2]["payload"]).encode()
        headers = {**deliveries[2]["headers"],
                   "X-Hub-Signature-256": github_signature(b"hook-secret", body)}  # fmt: skip
        answer = await http.post("/v1/results/github", data=body, headers=headers)
        assert answer.status == 200, await answer.text()
        assert (await answer.json())["applied"][0]["teams"] == ["a/budget", "b/budget"]
        headers["X-Hub-Signature-256"] = github_signature(b"wrong", body)
        assert (await http.post("/v1/results/github", data=body, headers=headers)).status == 401
        reverted = await http.post("/v1/results", headers=auth("admin-token"),
                                   json={**report(outcome="reverted"),
                                         "time": "2026-11-30T00:00:00Z"})  # fmt: skip
        assert (await reverted.json())["teams"] == ["a/budget", "b/budget"]

    accountant = run(tmp_path, scenario)
    for team in ("a/budget", "b/budget"):
        repo = accountant.books[team].changes.status().by_repository[0]
        assert (repo.merged.changes, repo.reverted.changes) == (0, 1)


def test_an_outcome_no_team_spent_on_queues_no_write(tmp_path):
    async def scenario(http: TestClient) -> None:
        answer = await http.post("/v1/results", json=report("999"), headers=auth("admin-token"))
        assert answer.status == 200
        assert (await answer.json())["teams"] == []

    assert run(tmp_path, scenario).writes == 0


def test_only_the_leader_applies(tmp_path):
    async def scenario(http: TestClient) -> None:
        answer = await http.post("/v1/results", json=report(), headers=auth("admin-token"))
        assert answer.status == 503

    accountant = run(tmp_path, scenario, leader=False)
    assert accountant.merged("a/budget") == 0
