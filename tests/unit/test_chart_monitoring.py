"""The chart's Grafana dashboard and PrometheusRule: rendered behind their values, and
querying only series the operator and the gateway export."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from costwarden.cluster import ensure_cli_tools
from costwarden.gitops.metricsdoc import exported_series

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "costwarden"
DASHBOARD = CHART / "dashboards" / "costwarden.json"
RULES = CHART / "alerts" / "costwarden-rules.yaml"
NAMESPACE = "costwarden-system"
BOTH_ON = ("--set", "dashboards.enabled=true,prometheusRule.enabled=true")
METRIC = re.compile(r"\b(costwarden_[a-z0-9_]+)\b")


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "c"), "HELM_CONFIG_HOME": str(home / "f"),
           "HELM_DATA_HOME": str(home / "d")}  # fmt: skip
    binary = str(ensure_cli_tools() / "helm")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    return run


def _template(helm: Any, *args: str) -> list[dict[str, Any]]:
    result = helm("template", "cw", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _expressions() -> dict[str, str]:
    """Where → PromQL, for every query of the dashboard and every alert rule."""
    found = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = variable["definition"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def test_every_metric_queried_is_exported_by_the_operator_or_the_gateway():
    exported = exported_series()
    used = {where: METRIC.findall(expr) for where, expr in _expressions().items()}
    assert all(used.values()), [w for w, names in used.items() if not names]
    unknown = {w: sorted(set(n) - exported) for w, n in used.items() if set(n) - exported}
    assert not unknown, unknown


def test_the_dashboard_shows_what_the_issue_asks_for():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {
        "Spend vs budget per team", "Cost per model", "Cost per succeeded job",
        "Refused calls by reason", "Enforcement actions",
    } <= titles  # fmt: skip


def test_the_alerts_cover_soft_limit_hard_cap_and_loops():
    alerts = {
        r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    }
    assert {"CostwardenSoftLimitReached", "CostwardenHardCapReached", "CostwardenLoopDetected"} <= (
        set(alerts)
    )
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_nothing_is_rendered_by_default(helm: Any):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in _template(helm)}
    assert ("ConfigMap", "cw-costwarden-dashboards") not in kinds
    assert not [k for k in kinds if k[0] == "PrometheusRule"]


def test_dashboard_config_map_carries_the_sidecar_label_and_the_json(helm: Any):
    objects = _template(helm, *BOTH_ON, "--set", "dashboards.annotations.grafana_folder=Costs")
    [config_map] = [o for o in objects if o["metadata"]["name"] == "cw-costwarden-dashboards"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == "cw"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Costs"}
    assert json.loads(config_map["data"]["costwarden.json"]) == json.loads(DASHBOARD.read_text())


def test_prometheus_rule_holds_the_rules_file_verbatim(helm: Any):
    objects = _template(helm, *BOTH_ON, "--set", "prometheusRule.labels.release=kps")
    [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["metadata"]["namespace"] == NAMESPACE
    # Prometheus' own {{ $labels.team }} templates survive Helm untouched.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert "{{ $labels.team }}" in json.dumps(rule["spec"])


def test_lint_strict_passes_with_both_on(helm: Any):
    result = helm("lint", "--strict", str(CHART), *BOTH_ON)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_refuses_unknown_keys(helm: Any):
    result = helm("template", "cw", str(CHART), "--set", "dashboards.enable=true")
    assert result.returncode != 0
    assert "enable" in result.stderr
