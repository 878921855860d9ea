"""`costwarden diff` between two git commits, the working tree, or two folders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.manifests import EXAMPLES_DIR

NOW = "2026-01-10T12:00:00Z"


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with the examples committed, then a second commit changing them."""
    _git(tmp_path, "init", "-q", "-b", "main")
    shutil.copytree(EXAMPLES_DIR, tmp_path / "examples")
    (tmp_path / "README.md").write_text("not a manifest\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "examples")
    examples = tmp_path / "examples"
    _edit(examples / "20-teambudget-payments.yaml", "hardCapUSD: 500", "hardCapUSD: 750")
    _edit(examples / "20-teambudget-payments.yaml", "timeZone: Europe/Berlin",
          "timeZone: Europe/Lisbon")  # fmt: skip
    _edit(examples / "21-teambudget-support.yaml", 'amountUSD: "40.00"', 'amountUSD: "30.00"')
    _edit(examples / "21-teambudget-support.yaml", "jobs: Delete", "jobs: Suspend")
    policy = examples / "10-routingpolicy-standard.yaml"
    # The routine rule moves ahead of code review and now sends summaries to gpt-4.1.
    _edit(policy, """    - name: code-review-with-tools
      match:
        tasks: [code-review, refactor]
        hasTools: true
      model: gpt-4.1
      fallbacks: [gpt-4.1-mini]
""", "")  # fmt: skip
    _edit(policy, """      model: gpt-4.1-mini
  softLimitDowngrades:""", """      model: gpt-4.1
    - name: code-review-with-tools
      match:
        tasks: [code-review, refactor]
        hasTools: true
      model: gpt-4.1
      fallbacks: [gpt-4.1-mini]
  softLimitDowngrades:""")  # fmt: skip
    _edit(policy, 'inputPerMTokUSD: "0.10"', 'inputPerMTokUSD: "0.12"')
    _git(tmp_path, "commit", "-q", "-am", "change")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_diff_between_two_commits_says_what_changes(cli, repo: Path):
    run = cli("diff", "--base", "HEAD~1", "--head", "HEAD", "--now", NOW)
    assert run.code == 0, run.err
    text = run.out
    assert "TeamBudget team-payments/payments\n" in text
    assert "hard cap raised from $500.00 to $750.00 (+$250.00, +50%)" in text
    assert "soft limit raised from $400.00 to $600.00 (+$200.00, +50%)" in text
    assert "periods start at midnight Europe/Lisbon instead of Europe/Berlin" in text
    assert "soft limit lowered from $40.00 to $30.00 (-$10.00, -25%) (a fixed amount)" in text
    assert "running agent Jobs at the hard cap: Delete → Suspend" in text
    assert "price of llama-in-cluster (input) $0.10 → $0.12 per 1M tokens (+20%)" in text
    assert (
        "rules reordered: confidential-stays-in-cluster, code-review-with-tools, "
        "anthropic-clients, routine → confidential-stays-in-cluster, anthropic-clients, "
        "routine, code-review-with-tools" in text
    )
    assert "rule routine changed: was tasks=" in text
    assert "calls routed to a different model" in text
    # Summaries with or without tools now go to gpt-4.1; Confidential ones stay in-cluster.
    routed = [line.strip() for line in text.splitlines() if "(rule routine) →" in line]
    assert routed == [
        "OpenAI-format calls, task classify, summarize or triage, Public or Internal, "
        "asking for another model: gpt-4.1-mini (rule routine) → gpt-4.1 (rule routine)"
    ]


def test_diff_json_is_for_bots(cli, repo: Path):
    run = cli("diff", "--base", "HEAD~1", "--head", "HEAD", "--now", NOW, "-o", "json")
    changes = run.json()["changes"]
    cap = next(c for c in changes if c["topic"] == "hardCap")
    assert (cap["object"], cap["old"], cap["new"]) == (
        "TeamBudget team-payments/payments",
        "500",
        "750",
    )
    routing = next(c for c in changes if c["topic"] == "routing")
    assert routing["details"], routing
    assert {c["topic"] for c in changes} >= {
        "hardCap", "softLimit", "period", "enforcement", "price", "rules", "routing",
    }  # fmt: skip


def test_diff_against_the_working_tree(cli, repo: Path):
    _edit(repo / "examples" / "21-teambudget-support.yaml", 'hardCapUSD: "50.00"', "hardCapUSD: 45")
    run = cli("diff", "--base", "HEAD", "--now", NOW)
    assert run.out.splitlines() == [
        "TeamBudget team-support/support",
        "  - hard cap lowered from $50.00 to $45.00 (-$5.00, -10%)",
    ]


def test_no_change_says_so(cli, repo: Path):
    run = cli("diff", "--base", "HEAD", "--head", "HEAD", "examples")
    assert run.out == "no change to TeamBudgets or RoutingPolicies\n"


def test_added_removed_and_invalid_objects(cli, tmp_path: Path):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(EXAMPLES_DIR, old)
    shutil.copytree(EXAMPLES_DIR, new)
    (new / "21-teambudget-support.yaml").unlink()
    _edit(new / "20-teambudget-payments.yaml", "name: standard", "name: premium")
    run = cli("diff", str(old), str(new), "--now", NOW)
    assert "TeamBudget team-support/support\n  - TeamBudget removed" in run.out
    assert "routed by ai-platform/premium instead of ai-platform/standard" in run.out
    assert (
        "not applied by the operator: RoutingPolicyNotFound: spec.routingPolicyRef: "
        "RoutingPolicy ai-platform/premium does not exist" in run.out
    )


def test_unknown_revision_exits_2(cli, repo: Path):
    run = cli("diff", "--base", "no-such-rev")
    assert run.code == 2
    assert "no-such-rev" in run.err


def test_two_paths_or_a_base_are_required(cli, tmp_path: Path):
    assert cli("diff", str(tmp_path)).code == 2
