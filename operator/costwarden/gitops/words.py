"""Small helpers that put changes into words a reviewer reads: money, percentages, fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from costwarden.api.money import format_money


@dataclass(frozen=True)
class Change:
    """One thing a change does, in a sentence, with the values for programs."""

    object: str
    """``Kind namespace/name`` of the object the change is about."""
    topic: str
    """What kind of change: hardCap, softLimit, period, enforcement, rules, defaultModel,
    routing, price, model, added, removed, invalid, field."""
    text: str
    old: Any = None
    new: Any = None
    details: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "object": self.object,
            "topic": self.topic,
            "text": self.text,
            "old": _plain(self.old),
            "new": _plain(self.new),
            "details": self.details,
        }


def _plain(value: Any) -> Any:
    """JSON-safe: Decimals as exact strings, everything else as JSON already takes it."""
    return json.loads(json.dumps(value, default=str))


def usd(amount: Decimal) -> str:
    return f"${format_money(amount)}"


def signed_usd(amount: Decimal) -> str:
    return f"+{usd(amount)}" if amount >= 0 else f"-{usd(-amount)}"


def percent_change(old: Decimal, new: Decimal) -> str:
    """``+50%``, ``-12.5%``; ``new`` when there was nothing before."""
    if old == 0:
        return "from zero"
    change = ((new - old) / old * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    text = format(change.normalize(), "f") if change != change.to_integral() else str(int(change))
    return f"+{text}%" if change > 0 else f"{text}%"


def raised_or_lowered(what: str, old: Decimal, new: Decimal, unit: str = "") -> str:
    verb = "raised" if new > old else "lowered"
    return (
        f"{what} {verb} from {usd(old)}{unit} to {usd(new)}{unit} "
        f"({signed_usd(new - old)}, {percent_change(old, new)})"
    )


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A wire object as ``path → leaf value`` (``workloads.namespaces[0]``); empty lists and
    objects are leaves, so a field emptied or filled shows up."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def field_changes(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...]) -> list[str]:
    """``path: old → new`` for every leaf that differs, except under the ``skip`` prefixes."""
    before, after = flatten(old), flatten(new)
    lines = []
    for path in sorted(set(before) | set(after)):
        if any(path == s or path.startswith((f"{s}.", f"{s}[")) for s in skip):
            continue
        if before.get(path) != after.get(path):
            lines.append(f"{path}: {show(before.get(path))} → {show(after.get(path))}")
    return lines
