"""The replay estimate against a case computed by hand, to the exact Decimal."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

POLICY = """\
apiVersion: costwarden.io/v1alpha1
kind: RoutingPolicy
metadata: {{name: p, namespace: ns}}
spec:
  models:
    - {{name: gpt-4.1, provider: OpenAI, endpoint: "https://api.openai.com/v1"}}
    - {{name: gpt-4.1-mini, provider: OpenAI, endpoint: "https://api.openai.com/v1"}}
  defaultModel: gpt-4.1-mini
  rules:
    - {{name: review, match: {{tasks: [code-review]}}, model: {review_model}}}
---
apiVersion: costwarden.io/v1alpha1
kind: TeamBudget
metadata: {{name: team, namespace: ns}}
spec:
  hardCapUSD: 1000
  routingPolicyRef: {{name: p}}
"""


def _record(time: str, rule: str, **tokens: int) -> str:
    return json.dumps(
        {
            "apiVersion": "costwarden.io/v1alpha1", "kind": "UsageRecord",
            "id": f"id-{time}", "time": time, "team": "ns/team", "namespace": "ns",
            "endpoint": "chat.completions", "requestedModel": "gpt-4.1",
            "servedModel": "x", "rule": rule, "policy": "ns/p", "provider": "OpenAI",
            "tokens": tokens, "usageReported": True, "costUSD": "1.5", "outcome": "OK",
            "aFieldFromTheFuture": "ignored",
        }
    )  # fmt: skip


@pytest.fixture
def change(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(POLICY.format(review_model="gpt-4.1"))
    new.write_text(POLICY.format(review_model="gpt-4.1-mini"))
    return old, new


def test_replay_matches_the_hand_computed_estimate(cli, tmp_path: Path, change):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(
        "\n".join(
            [
                # A code review (task inferred from rule "review"): 1M input, 200k cached,
                # 100k output tokens.
                _record(
                    "2026-01-01T00:00:00Z",
                    "review",
                    input=1_000_000,
                    cachedInput=200_000,
                    output=100_000,
                ),
                # A default-rule call: 500k input tokens.
                _record("2026-01-11T00:00:00Z", "default", input=500_000),
                json.dumps({"kind": "LoopSignal", "team": "ns/team"}),
                json.dumps(
                    {
                        "kind": "UsageRecord",
                        "time": "2026-01-05T00:00:00Z",
                        "endpoint": "chat.completions",
                        "outcome": "Refused",
                        "usageReported": False,
                    }
                ),
                '{"kind": "UsageRecord", "ti',  # a torn last line after a crash
            ]
        )
    )
    run = cli("diff", *map(str, change), "--usage", str(ledger), "-o", "json")
    assert run.code == 0, run.err
    replay = run.json()["replay"]
    # Old: the review on gpt-4.1 ($2 in, $0.50 cached, $8 out per 1M) = 2 + 0.10 + 0.80 = 2.90,
    #      the default call on gpt-4.1-mini ($0.40 in) = 0.20; total 3.10.
    # New: the review on gpt-4.1-mini ($0.40, $0.10, $1.60) = 0.40 + 0.02 + 0.16 = 0.58;
    #      total 0.78. The calls span 10 days: a 30-day month is 3x.
    assert Decimal(replay["oldCostUSD"]) == Decimal("3.10")
    assert Decimal(replay["newCostUSD"]) == Decimal("0.78")
    assert replay["days"] == "10"
    assert Decimal(replay["oldMonthlyUSD"]) == Decimal("9.30")
    assert Decimal(replay["newMonthlyUSD"]) == Decimal("2.34")
    assert Decimal(replay["monthlyChangeUSD"]) == Decimal("-6.96")
    assert Decimal(replay["recordedCostUSD"]) == Decimal("3.0")
    assert replay["calls"] == 2
    assert replay["movedCalls"] == 1
    assert replay["inferredCalls"] == 2
    assert replay["moves"] == [
        {"from": "gpt-4.1 (rule review)", "to": "gpt-4.1-mini (rule review)", "calls": 1}
    ]
    assert replay["skipped"] == {
        "not a usage record": 1,
        "no reported usage (refused or failed)": 1,
        "unparsable line": 1,
    }
    text = cli("diff", *map(str, change), "--usage", str(ledger)).out
    assert "change: -$6.96 per month" in text
    assert "a month is 30 days" in text


def test_csv_export_with_recorded_hints_and_declared_days(cli, tmp_path: Path, change):
    usage = tmp_path / "usage.csv"
    usage.write_text(
        "time,team,policy,rule,provider,requestedModel,inputTokens,outputTokens,"
        "cachedInputTokens,cacheCreationTokens,task,sensitivity,hasTools\n"
        "2026-01-01T00:00:00Z,ns/team,ns/p,review,OpenAI,gpt-4.1,1000000,100000,200000,0,"
        "code-review,Internal,false\n"
        # A summary served by the default rule, its task recorded in the export.
        "2026-01-02T00:00:00Z,ns/team,ns/p,default,OpenAI,,500000,0,0,0,summarize,,\n"
    )
    replay = cli(
        "diff", *map(str, change), "--usage", str(usage), "--usage-days", "30", "-o", "json"
    ).json()["replay"]
    assert Decimal(replay["oldMonthlyUSD"]) == Decimal("3.10")
    assert Decimal(replay["newMonthlyUSD"]) == Decimal("0.78")
    assert replay["inferredCalls"] == 1  # the second row has no sensitivity / tools


def test_unreadable_usage_exits_2(cli, tmp_path: Path, change):
    bad = tmp_path / "usage.csv"
    bad.write_text("time,team\n")
    run = cli("diff", *map(str, change), "--usage", str(bad))
    assert run.code == 2
    assert "lacks the columns" in run.err


def test_replayed_tool_calls_are_priced_at_the_models_per_call_price():
    """A Responses API call with web searches costs its tokens plus each search at the
    replayed model's toolCallUSD (exact)."""
    from datetime import UTC, datetime

    from costwarden.api.gatewayconfig import ModelRoute, PolicyConfig, ResolvedPricing
    from costwarden.api.routingpolicy import Provider
    from costwarden.api.teambudget import TokenUsage
    from costwarden.gitops.replay import _cost
    from costwarden.gitops.usage import UsedCall

    pricing = ResolvedPricing.model_validate(
        {
            "inputPerMTokUSD": "1",
            "outputPerMTokUSD": "2",
            "cachedInputPerMTokUSD": "1",
            "cacheWritePerMTokUSD": "1",
            "toolCallUSD": {"web_search_call": "0.01"},
        }
    )
    route = ModelRoute(
        name="m", provider=Provider.OPENAI, endpoint="http://x/v1", upstream_model="m",
        locality="External", pricing=pricing,
    )  # fmt: skip
    policy = PolicyConfig(id="ns/p", models=[route], default_model="m")
    call = UsedCall(
        time=datetime(2026, 11, 1, tzinfo=UTC), team="ns/t", policy="ns/p", rule="default",
        provider=Provider.OPENAI, requested_model="m", tokens=TokenUsage(input=1000, output=500),
        tool_calls={"web_search_call": 3},
    )  # fmt: skip

    assert _cost(call, policy, "m") == Decimal("0.002") + Decimal("0.03")
