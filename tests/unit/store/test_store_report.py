"""``costwarden report``: spend by tag, cost per merged change and waste, exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from costwarden.api.usage import Outcome
from costwarden.cli import main
from costwarden.store import query
from costwarden.store.writer import StoreEntry, UsageStore
from tests.unit.store.conftest import CLAUDE, GPT, make_record

WHEN = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def seed(root: Path) -> dict[str, Decimal]:
    """Three changes in two repositories, by two teams; one merged change spans teams."""
    plan = [
        # team, repository, change, model pricing, input, output
        ("team-a/a", "acme/web", "101", GPT, 10_000, 1_000),
        ("team-a/a", "acme/web", "101", GPT, 4_000, 2_000),
        ("team-b/b", "acme/web", "102", CLAUDE, 20_000, 3_000),
        ("team-b/b", "acme/api", "7", CLAUDE, 1_000, 500),
        ("team-a/a", "acme/web", "103", GPT, 3_000, 300),  # closed unmerged
    ]
    store = UsageStore(root)
    costs: dict[str, Decimal] = {}
    for seq, (team, repo, change, pricing, inp, out) in enumerate(plan, 1):
        record = make_record(
            team=team, pricing=pricing, inp=inp, out=out, when=WHEN,
            model="gpt-4.1" if pricing is GPT else "claude-sonnet-4",
            provider="OpenAI" if pricing is GPT else "Anthropic",
            labels={"repository": repo, "change": change, "environment": "ci"},
        )  # fmt: skip
        costs[change] = costs.get(change, Decimal(0)) + record.cost_usd
        store.write("gw#1", team, [StoreEntry(seq, record, pricing)])

    def outcome(repo: str, change: str, result: str, hour: int = 12) -> dict[str, object]:
        return {"repository": repo, "change": change, "outcome": result,
                "time": WHEN.replace(hour=hour), "source": "forge"}  # fmt: skip

    store.write_outcomes([
        outcome("acme/web", "101", "merged"),
        outcome("acme/web", "102", "closed"),
        outcome("acme/web", "102", "merged", hour=13),  # reopened and merged: latest wins
        outcome("acme/web", "103", "closed"),
        outcome("acme/api", "7", "merged"),
    ])  # fmt: skip
    return costs


def test_cost_per_merged_change_per_repository_is_exact(tmp_path: Path) -> None:
    costs = seed(tmp_path)
    # by hand: change 101 = (10000*2 + 1000*8 + 4000*2 + 2000*8) / 1e6 = 0.052
    assert costs["101"] == Decimal("0.052")
    # change 102 = (20000*3 + 3000*15) / 1e6 = 0.105; change 7 = (1000*3 + 500*15)/1e6 = 0.0105
    assert costs["102"] == Decimal("0.105")
    assert costs["7"] == Decimal("0.0105")
    result = query.changes(query.connect(tmp_path)).as_dicts()
    by_repo = {r["repository"]: r for r in result}
    web = by_repo["acme/web"]
    assert web["merged_changes"] == 2
    assert web["merged_cost_usd"] == Decimal("0.157")
    assert web["cost_per_merged_change_usd"] == Decimal("0.157") / 2 == Decimal("0.0785")
    assert web["unmerged_changes"] == 1
    assert web["unmerged_cost_usd"] == Decimal("0.0084")  # (3000*2 + 300*8) / 1e6
    assert by_repo["acme/api"]["cost_per_merged_change_usd"] == Decimal("0.0105")
    assert [r["repository"] for r in result] == ["acme/web", "acme/api"]  # costliest first


def test_spend_by_tags(tmp_path: Path) -> None:
    seed(tmp_path)
    con = query.connect(tmp_path, query.Period.parse("2026-11"))
    by_team = {r["team"]: r for r in query.spend_by(con, ["team"]).as_dicts()}
    assert by_team["team-a/a"]["cost_usd"] == Decimal("0.0604")
    assert by_team["team-a/a"]["calls"] == 3
    assert by_team["team-b/b"]["cost_usd"] == Decimal("0.1155")
    [ci] = query.spend_by(con, ["environment"]).as_dicts()
    assert ci["cost_usd"] == Decimal("0.1759")
    # another month reads nothing
    empty = query.connect(tmp_path, query.Period.parse("2026-10"))
    assert query.spend_by(empty, ["team"]).rows == []


def test_waste_counts_failed_disconnected_and_stopped_work(tmp_path: Path) -> None:
    store = UsageStore(tmp_path)
    entries = [
        make_record(job="runaway", inp=50_000, out=10_000),  # 0.18
        make_record(job="runaway", outcome=Outcome.REFUSED, reason="job_cost_cap_reached"),
        make_record(job="ok", inp=1_000, out=100),  # 0.0028, not waste
        make_record(job="ok", outcome=Outcome.CLIENT_DISCONNECTED, inp=2_000, out=0),  # 0.004
        make_record(job="ok", outcome=Outcome.UPSTREAM_ERROR),
    ]
    store.write("gw#1", "team-a/a", [StoreEntry(n, r, GPT) for n, r in enumerate(entries, 1)])
    waste = {r["category"]: r for r in query.waste(query.connect(tmp_path)).as_dicts()}
    assert waste["stopped_jobs"]["cost_usd"] == Decimal("0.18")
    assert waste["stopped_jobs"]["calls"] == 2
    assert waste["calls_ClientDisconnected"]["cost_usd"] == Decimal("0.004")
    assert waste["calls_UpstreamError"]["calls"] == 1
    assert waste["calls_Refused"]["calls"] == 1


def test_cli_prints_table_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(tmp_path)
    assert main(["report", "changes", "--store", str(tmp_path), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["repository"] == "acme/web"
    assert data[0]["cost_per_merged_change_usd"] == "0.0785"  # a string: exact
    assert (
        main(["report", "spend", "--store", str(tmp_path), "--by", "repository", "-o", "csv"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "repository,calls,tokens,cost_usd"
    assert lines[1] == "acme/web,4,43300,0.1654"
    assert main(["report", "waste", "--store", str(tmp_path)]) == 0
    assert "unmerged_changes" in capsys.readouterr().out


def test_outcomes_from_a_file(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "store")
    store.write("gw#1", "team-a/a", [StoreEntry(1, make_record(
        labels={"repository": "r", "change": "1"}), GPT)])  # fmt: skip
    outcomes = tmp_path / "outcomes.jsonl"
    outcomes.write_text(
        '{"repository": "r", "change": "1", "outcome": "merged", '
        '"time": "2026-11-03T15:00:00Z", "source": "ci"}\n'
    )
    [row] = query.changes(query.connect(tmp_path / "store", outcomes=[outcomes])).as_dicts()
    assert row["merged_changes"] == 1
    assert row["cost_per_merged_change_usd"] == Decimal("0.0028")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"repository": "r", "change": "1", "outcome": "merged"}]')
    with pytest.raises(ValueError, match="lacks time"):
        query.connect(tmp_path / "store", outcomes=[bad])
