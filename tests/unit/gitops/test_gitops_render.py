"""`costwarden render`: the operator's gateway configuration for a folder, reproducibly."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from costwarden.api.catalog import default_catalog
from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.gitops.loader import load_paths
from costwarden.policy.render import ObservedObject, reconcile
from tests.support.manifests import EXAMPLES_DIR, example_documents

NOW = "2026-01-10T12:00:00Z"


def test_render_prints_what_the_operator_would_publish(cli):
    run = cli("render", "--now", NOW, str(EXAMPLES_DIR))
    assert run.code == 0, run.err
    rendered = GatewayConfig.model_validate(run.json())
    # The operator's own decision on the same objects (as the reconciler observes them).
    observed = [
        ObservedObject(d["metadata"]["namespace"], d["metadata"]["name"], 1, d["spec"])
        for d in example_documents()
        if d["apiVersion"].startswith("costwarden.io/")
    ]
    expected = reconcile(
        [o for o in observed if "hardCapUSD" in o.spec],
        [o for o in observed if "models" in o.spec],
        default_catalog(),
        datetime(2026, 1, 10, 12, tzinfo=UTC),
    ).config
    assert rendered == expected
    assert [t.id for t in rendered.teams] == ["team-payments/payments", "team-support/support"]


def test_render_is_stable_and_sorted(cli):
    first = cli("render", "--now", NOW, str(EXAMPLES_DIR)).out
    second = cli("render", "--now", NOW, *sorted(str(p) for p in EXAMPLES_DIR.glob("*.yaml"))).out
    assert first == second
    assert first == json.dumps(json.loads(first), indent=2, sort_keys=True) + "\n"


def test_now_fixes_the_period(cli):
    config = cli("render", "--now", NOW, str(EXAMPLES_DIR)).json()
    support = next(t for t in config["teams"] if t["id"] == "team-support/support")
    # Daily in America/New_York: midnight EST is 05:00 UTC.
    assert support["spend"]["periodStart"] == "2026-01-10T05:00:00Z"
    other_day = cli("render", "--now", "2026-01-11T12:00:00Z", str(EXAMPLES_DIR)).json()
    assert other_day["revision"] != config["revision"]


def test_objects_the_operator_would_leave_out_are_listed_on_stderr(cli, tmp_path: Path):
    (tmp_path / "budget.yaml").write_text(
        (EXAMPLES_DIR / "20-teambudget-payments.yaml").read_text()
    )
    run = cli("render", "--now", NOW, str(tmp_path))
    assert run.code == 1
    assert run.json()["teams"] == []
    assert "left out: TeamBudget team-payments/payments: RoutingPolicyNotFound" in run.err


def test_loader_reads_the_examples_in_order():
    documents = load_paths([str(EXAMPLES_DIR)])
    assert [d.body["kind"] for d in documents][-3:] == ["RoutingPolicy", "TeamBudget", "TeamBudget"]


def test_render_takes_consent_from_the_namespace_manifests_in_the_set(cli, tmp_path: Path):
    budget = (
        "apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\n"
        "metadata: {name: all, namespace: platform}\n"
        "spec: {hardCapUSD: 10, workloads: {namespaces: [platform, batch]}}\n"
    )
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: batch\n"
        "  annotations: {costwarden.io/budget: platform/all}\n"
    )
    (tmp_path / "budget.yaml").write_text(budget)
    alone = GatewayConfig.model_validate(cli("render", "--now", NOW, str(tmp_path)).json())
    assert alone.teams[0].namespaces == ["platform"]  # no consent in the set
    (tmp_path / "namespace.yaml").write_text(namespace)
    both = GatewayConfig.model_validate(cli("render", "--now", NOW, str(tmp_path)).json())
    assert both.teams[0].namespaces == ["batch", "platform"]
