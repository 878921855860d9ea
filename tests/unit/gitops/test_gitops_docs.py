"""Generated docs match the code they are generated from (regenerate, never hand-edit)."""

from __future__ import annotations

import re
from pathlib import Path

from costwarden.gitops import apidocs, metricsdoc, valuesdoc

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"


def test_api_reference_is_generated_from_the_crd_schema():
    assert (DOCS / "api-reference.md").read_text() == apidocs.render(), (
        "run: python -m costwarden.gitops.apidocs > docs/api-reference.md"
    )


def test_metrics_list_is_generated_from_the_metric_objects():
    assert (DOCS / "metrics.md").read_text() == metricsdoc.render(), (
        "run: python -m costwarden.gitops.metricsdoc > docs/metrics.md"
    )


def test_helm_values_table_is_generated_from_the_chart():
    document = (DOCS / "install-helm.md").read_text()
    table = valuesdoc.render(ROOT / "charts" / "costwarden")
    assert valuesdoc.replace_table(document, table) == document, (
        "run: python -m costwarden.gitops.valuesdoc --write docs/install-helm.md"
    )


def test_every_field_of_both_kinds_is_documented():
    text = (DOCS / "api-reference.md").read_text()
    for field in ("spec.hardCapUSD", "spec.onHardCap.jobs", "spec.rules[].match.hasTools",
                  "spec.softLimitDowngrades[].from", "status.conditions[].reason"):  # fmt: skip
        assert f"`{field}`" in text, field


def test_every_value_has_a_row():
    text = (DOCS / "install-helm.md").read_text()
    for key in ("dashboards.enabled", "prometheusRule.enabled", "gateway.service.port"):
        assert f"| `{key}` |" in text, key


HAND_WRITTEN = ("README.md", "concepts.md", "install-helm.md", "agents.md", "gitops.md",
                "troubleshooting.md")  # fmt: skip


def test_hand_written_pages_link_to_files_that_exist():
    for name in HAND_WRITTEN:
        text = re.sub(r"`[^`]*`", "", (DOCS / name).read_text())  # code is not a link
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (DOCS / target).exists(), (name, target)
