"""Attribution tags (pure): read from the pod's costwarden.io/ annotations and labels, only
the keys the TeamBudget declares, each value bounded; a bad value is _invalid, never dropped
silently and never a reason to lose the spend."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from costwarden.api.attribution import FIXED_KEYS, Attribution, AttributionKey
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.policy.attribution import INVALID, glob_match, tags_for


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("acme/*", "acme/api", True),
        ("acme/*", "other/api", False),
        ("*", "", True),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("*-prod", "eu-prod", True),
        ("*-prod", "eu-prod-2", False),
        ("a*b*c", "axxbyyc", True),
        ("a*b*c", "axxbyy", False),
        ("exact", "exact", True),
        ("exact", "exactly", False),
    ],
)
def test_glob_matching(pattern: str, value: str, matches: bool):
    assert glob_match(pattern, value) is matches


def test_a_pathological_glob_is_matched_in_linear_time():
    # (a*)^30 b against 63 a's: catastrophic for a backtracking regex, instant here.
    assert glob_match("a*" * 30 + "b", "a" * 63) is False


def test_the_default_keys_are_the_five_fixed_ones_read_from_annotations_then_labels():
    labels = {
        "costwarden.io/project": "checkout",
        "costwarden.io/change": "123",
        "costwarden.io/repository": "ignored-when-annotated",
        "costwarden.io/not-declared": "x",
        "app": "not-a-tag",
    }
    annotations = {"costwarden.io/repository": "Acme/API.git", "costwarden.io/environment": "ci"}
    tags = tags_for(labels, annotations, Attribution())
    assert tags.values == {
        "project": "checkout",
        "change": "123",
        "repository": "acme/api",  # normalized as a forge's full_name is
        "environment": "ci",
    }
    assert tags.invalid == ()
    assert [k.name for k in Attribution().keys] == list(FIXED_KEYS)


def test_values_outside_the_declared_limits_are_recorded_as_invalid():
    attribution = Attribution(
        keys=[
            AttributionKey(name="repository", pattern="acme/*"),
            AttributionKey(name="environment", values=["prod", "ci"]),
            AttributionKey(name="change", max_length=6),
            AttributionKey(name="costcenter"),
        ]
    )
    annotations = {
        "costwarden.io/repository": "evil/api",
        "costwarden.io/environment": "staging",
        "costwarden.io/change": "#1234567",
        "costwarden.io/costcenter": "cc\x00-1",
        "costwarden.io/project": "not-declared-here",
    }
    tags = tags_for({}, annotations, attribution)
    assert tags.values == {
        "repository": INVALID,
        "environment": INVALID,
        "change": INVALID,
        "costcenter": INVALID,
    }
    assert set(tags.invalid) == {"repository", "environment", "change", "costcenter"}
    ok = tags_for({}, {"costwarden.io/repository": "acme/web", "costwarden.io/environment": "ci",
                       "costwarden.io/change": "#42"}, attribution)  # fmt: skip
    assert ok.values == {"repository": "acme/web", "environment": "ci", "change": "42"}


def test_at_most_eight_keys_besides_the_fixed_ones():
    extra = [AttributionKey(name=f"k{i}") for i in range(9)]
    with pytest.raises(ValidationError, match="at most 8 keys"):
        Attribution(keys=extra)
    Attribution(keys=[*extra[:8], *(AttributionKey(name=k) for k in FIXED_KEYS)])


def test_a_budget_without_attribution_gets_the_default_keys():
    spec = TeamBudgetSpec.model_validate({"hardCapUSD": "10"})
    assert [k.name for k in spec.attribution.keys] == list(FIXED_KEYS)
    with pytest.raises(ValidationError):
        TeamBudgetSpec.model_validate(
            {"hardCapUSD": "10", "attribution": {"keys": [{"name": "Bad_Key"}]}}
        )
