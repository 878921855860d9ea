"""The CRDs are generated from the models: the committed files must be exactly that output,
and the schema must be one the API server accepts as structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from costwarden.api.crd import all_crds, dump

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_committed_crds_equal_the_generated_ones(name: str):
    generated = dump(all_crds()[name])
    assert (ROOT / "crds" / name).read_text() == generated, (
        "crds/ drifted from the models: run `python -m costwarden.api.crd --write`"
    )


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found.extend(_walk(value, f"{path}.{key}"))
        if "items" in node:
            found.extend(_walk(node["items"], f"{path}[]"))
    return found


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_schema_is_structural_and_documented(name: str):
    version = all_crds()[name]["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: unions are not structural"
        else:
            assert "type" in node, f"{path} has no type"
        if path != "spec" and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description (kubectl explain)"


def test_printer_columns_a_person_reads_at_a_glance():
    budget = all_crds()["costwarden.io_teambudgets.yaml"]["spec"]
    columns = [c["name"] for c in budget["versions"][0]["additionalPrinterColumns"]]
    assert columns[:4] == ["Spent", "Limit", "Used", "Phase"]
    assert columns[-1] == "Age"
    assert budget["names"]["categories"] == ["costwarden"]
    assert "tb" in budget["names"]["shortNames"]


def test_dump_has_no_yaml_anchors():
    for manifest in all_crds().values():
        text = dump(manifest)
        assert "&id" not in text
        assert yaml.safe_load(text) == manifest
