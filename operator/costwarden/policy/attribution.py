"""Which attribution tags a pod's calls carry (pure): read, normalized, bounded.

The tags come from the pod as the API server has it (its ``costwarden.io/<key>``
annotations and labels), never from what a gateway or sidecar reports: ingestion calls
:func:`tags_for` with the pod it read itself (accounting.trust). Only the keys the team's
TeamBudget declares are kept, and a value outside its limits (too long, not among the
allowed values, not matching the glob, not printable) is recorded as :data:`INVALID`, so a
team creates at most ``len(values) + 1`` distinct values per key with ``values`` set, and
the spend is still counted (a tag never decides whether a call is charged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from costwarden.api.attribution import TAG_PREFIX, Attribution, AttributionKey
from costwarden.api.results import normalize_change, normalize_repository

INVALID = "_invalid"
"""The value recorded for a tag whose value the TeamBudget does not allow."""

_NORMALIZE = {"repository": normalize_repository, "change": normalize_change}


@dataclass(frozen=True)
class Tags:
    values: dict[str, str]
    invalid: tuple[str, ...] = ()
    """Keys whose value was replaced by INVALID."""


def glob_match(pattern: str, value: str) -> bool:
    """``*`` matches any run of characters (``/`` included), ``?`` one character; nothing
    else is special. Greedy with one backtrack point: O(len(pattern) * len(value)) at worst,
    so a tenant's pattern cannot make the operator's ingestion spin (a regex could)."""
    p = v = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and pattern[p] in ("?", value[v]) and pattern[p] != "*":
            p += 1
            v += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, v
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            v = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def allowed(key: AttributionKey, value: str) -> bool:
    if len(value) > key.max_length or not value.isprintable():
        return False
    normalize = _NORMALIZE.get(key.name, str.strip)
    if key.values and value not in {normalize(v) for v in key.values}:
        return False
    return key.pattern is None or glob_match(normalize(key.pattern), value)


def tags_for(
    labels: Mapping[str, str], annotations: Mapping[str, str], attribution: Attribution
) -> Tags:
    """The tags of a pod's calls: for each declared key, the annotation
    ``costwarden.io/<key>`` (which can hold ``owner/name``, a label value cannot), else the
    label; absent or empty means no tag."""
    values: dict[str, str] = {}
    invalid: list[str] = []
    for key in attribution.keys:
        name = TAG_PREFIX + key.name
        raw = annotations.get(name) or labels.get(name) or ""
        value = _NORMALIZE.get(key.name, str.strip)(raw)
        if not value:
            continue
        if allowed(key, value):
            values[key.name] = value
        else:
            values[key.name] = INVALID
            invalid.append(key.name)
    return Tags(values, tuple(invalid))


__all__ = ["INVALID", "Tags", "allowed", "glob_match", "tags_for"]
