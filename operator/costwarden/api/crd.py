"""Generate the CustomResourceDefinitions from the pydantic models.

The models are the single source of truth: field names, descriptions, defaults, bounds and
the cross-field CEL rules all come from them. ``crds/*.yaml`` and the chart's copies are
this module's output, and a unit test fails when they drift (``python -m costwarden.api.crd
--write`` regenerates them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from costwarden.api import routingpolicy, teambudget
from costwarden.api.base import WireModel
from costwarden.api.meta import CATEGORY, GROUP, VERSION

# Keys of pydantic's JSON schema that a Kubernetes structural schema keeps as they are.
_KEPT_KEYS = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "nullable",
    "anyOf",
}


def structural_schema(model: type[WireModel]) -> dict[str, Any]:
    """The OpenAPI v3 structural schema of a model: refs inlined, optionals unwrapped."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _convert(raw, definitions)


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    node = _unwrap(node, definitions)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEPT_KEYS or key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "properties":
            out["properties"] = {name: _convert(prop, definitions) for name, prop in value.items()}
        elif key == "items":
            out["items"] = _convert(value, definitions)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = _convert(value, definitions)
        # title, additionalProperties: false (structural schemas prune unknown fields and
        # kubectl's strict validation refuses them) and the rest are dropped on purpose.
    if out.get("required") == []:
        del out["required"]
    if "description" in out:
        out["description"] = out["description"].replace("``", "`")
    return _ordered(out)


_FIRST_KEYS = ("type", "description")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, so the YAML reads like hand-written CRDs."""
    first = {key: node[key] for key in _FIRST_KEYS if key in node}
    return {**first, **{k: v for k, v in sorted(node.items()) if k not in first}}


def _unwrap(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref`` and turn ``anyOf: [X, null]`` (an Optional field) into X."""
    siblings = {k: v for k, v in node.items() if k not in ("$ref", "anyOf")}
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return {**_unwrap(target, definitions), **_drop_none_default(siblings)}
    if "anyOf" in node and node.get("x-kubernetes-int-or-string"):
        return node
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node['anyOf']}")
        return {**_unwrap(options[0], definitions), **_drop_none_default(siblings)}
    return node


def _drop_none_default(siblings: dict[str, Any]) -> dict[str, Any]:
    if siblings.get("default", ...) is None:
        return {k: v for k, v in siblings.items() if k != "default"}
    return siblings


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    description: str,
    spec_model: type[WireModel],
    status_model: type[WireModel],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "costwarden.io/v1alpha1"},
            "kind": {"type": "string", "description": kind},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec_model),
            "status": structural_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "costwarden"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _ready_column() -> dict[str, Any]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    }


def teambudget_crd() -> dict[str, Any]:
    return _crd(
        kind=teambudget.KIND,
        plural=teambudget.PLURAL,
        singular=teambudget.SINGULAR,
        short_names=teambudget.SHORT_NAMES,
        description=(
            "TeamBudget caps what a team's workloads may spend on AI model calls per period, "
            "and says what happens at the soft limit, at the hard cap and when a job loops."
        ),
        spec_model=teambudget.TeamBudgetSpec,
        status_model=teambudget.TeamBudgetStatus,
        columns=[
            {
                "name": "Spent",
                "type": "string",
                "jsonPath": ".status.spentUSD",
                "description": "USD spent in the current period",
            },
            {
                "name": "Limit",
                "type": "string",
                "jsonPath": ".spec.hardCapUSD",
                "description": "Hard cap in USD per period",
            },
            {
                "name": "Used",
                "type": "string",
                "jsonPath": ".status.usedPercent",
                "description": "Spend as a percentage of the hard cap",
            },
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Period",
                "type": "string",
                "jsonPath": ".spec.period.schedule",
                "priority": 1,
            },
            {
                "name": "Policy",
                "type": "string",
                "jsonPath": ".spec.routingPolicyRef.name",
                "priority": 1,
            },
            _AGE,
        ],
    )


def routingpolicy_crd() -> dict[str, Any]:
    return _crd(
        kind=routingpolicy.KIND,
        plural=routingpolicy.PLURAL,
        singular=routingpolicy.SINGULAR,
        short_names=routingpolicy.SHORT_NAMES,
        description=(
            "RoutingPolicy declares the models a team may call, their prices, and the rules "
            "that pick a model for each call; confidential work stays on in-cluster models."
        ),
        spec_model=routingpolicy.RoutingPolicySpec,
        status_model=routingpolicy.RoutingPolicyStatus,
        columns=[
            {"name": "Default", "type": "string", "jsonPath": ".spec.defaultModel"},
            {"name": "Models", "type": "integer", "jsonPath": ".status.models"},
            {"name": "Teams", "type": "integer", "jsonPath": ".status.teams"},
            _ready_column(),
            _AGE,
        ],
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD manifest, for every kind."""
    return {
        f"{GROUP}_{teambudget.PLURAL}.yaml": teambudget_crd(),
        f"{GROUP}_{routingpolicy.PLURAL}.yaml": routingpolicy_crd(),
    }


HEADER = (
    "# Generated by `python -m costwarden.api.crd --write` from the pydantic models. Do not edit.\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-schemas are written out in full: anchors would puzzle a reader of the CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(manifest: dict[str, Any]) -> str:
    return HEADER + yaml.dump(manifest, Dumper=_NoAliasDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="write the CRDs into these folders (default: crds/ and charts/costwarden/crds/)",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write("---\n".join(dump(m) for m in all_crds().values()))
        return 0
    folders = args.write or [Path("crds"), Path("charts/costwarden/crds")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name, manifest in all_crds().items():
            (folder / name).write_text(dump(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
