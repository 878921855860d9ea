"""Whether two label selectors can select one workload: exact, per metav1 semantics."""

from __future__ import annotations

from typing import Any

import pytest

from costwarden.api.meta import LabelSelector
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.gitops.overlap import selectors_can_both_match, shared_namespaces


def _sel(labels: dict[str, str] | None = None, *exprs: tuple[str, str, list[str]]) -> Any:
    return LabelSelector.model_validate(
        {
            "matchLabels": labels or {},
            "matchExpressions": [{"key": k, "operator": op, "values": v} for k, op, v in exprs],
        }
    )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (None, None, True),
        (None, _sel({"team": "a"}), True),
        (_sel({"team": "a"}), _sel({"team": "b"}), False),
        (_sel({"team": "a"}), _sel({"app": "x"}), True),
        (_sel({}, ("team", "In", ["a", "b"])), _sel({"team": "b"}), True),
        (_sel({}, ("team", "In", ["a"])), _sel({}, ("team", "NotIn", ["a"])), False),
        (_sel({}, ("team", "NotIn", ["a"])), _sel({}, ("team", "NotIn", ["b"])), True),
        (_sel({}, ("team", "Exists", [])), _sel({}, ("team", "DoesNotExist", [])), False),
        (_sel({"team": "a"}), _sel({}, ("team", "DoesNotExist", [])), False),
        (_sel({}, ("gpu", "DoesNotExist", [])), _sel({}, ("team", "Exists", [])), True),
        (_sel({}, ("team", "In", ["a", "b"])), _sel({}, ("team", "In", ["b", "c"]),
                                                    ("team", "NotIn", ["b"])), False),
    ],
)  # fmt: skip
def test_selectors_overlap_exactly_when_one_label_set_satisfies_both(a, b, overlap):
    assert selectors_can_both_match(a, b) is overlap
    assert selectors_can_both_match(b, a) is overlap


def _budget(**workloads: Any) -> TeamBudgetSpec:
    return TeamBudgetSpec.model_validate({"hardCapUSD": 1, "workloads": workloads})


def test_an_empty_namespace_list_means_the_budgets_own_namespace():
    assert shared_namespaces(_budget(), "a", _budget(), "b") == set()
    assert shared_namespaces(_budget(), "a", _budget(namespaces=["a"]), "b") == {"a"}
    assert shared_namespaces(
        _budget(namespaces=["a", "c"]), "x", _budget(namespaces=["c", "d"]), "y"
    ) == {"c"}
