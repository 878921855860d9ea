"""Reading a usage export for replay: the gateway's JSON Lines ledger, or a CSV.

The ledger (docs/ledger.md) is read as its consumers must: unknown fields are ignored (new
fields are only ever added), a torn last line is skipped, loop signals are skipped, and
only calls whose tokens the upstream reported are replayed. The routing hints a record
does not carry today (task, sensitivity, tools) are read when present, so an export that
adds them replays exactly; otherwise the replay infers them (see ``replay``).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from costwarden.api.routingpolicy import Provider, Sensitivity
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import UsageRecord
from costwarden.gitops.loader import ReadError

CSV_COLUMNS = (
    "time",
    "team",
    "policy",
    "rule",
    "provider",
    "requestedModel",
    "inputTokens",
    "outputTokens",
    "cachedInputTokens",
    "cacheCreationTokens",
    "task",
    "sensitivity",
    "hasTools",
)
"""The CSV export's columns (header row required). The first eight are required; the
last three are optional routing hints (docs/gitops.md)."""
_REQUIRED_CSV = CSV_COLUMNS[:8]
_RECORD_FIELDS = {info.alias or name for name, info in UsageRecord.model_fields.items()}


@dataclass(frozen=True)
class UsedCall:
    """One metered call, as much as the replay needs of it."""

    time: datetime
    team: str
    policy: str
    rule: str
    provider: Provider
    requested_model: str
    tokens: TokenUsage
    task: str | None = None
    sensitivity: Sensitivity | None = None
    has_tools: bool | None = None
    recorded_cost: Decimal | None = None
    tool_calls: dict[str, int] = field(default_factory=dict)
    """Provider-run tool calls billed per call (ledger records only; CSV exports have none)."""

    @property
    def prompt_tokens(self) -> int:
        return self.tokens.prompt()


@dataclass
class UsageExport:
    calls: list[UsedCall] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def read_usage(path: Path) -> UsageExport:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReadError(f"{path}: cannot read: {error}") from error
    if path.suffix.lower() == ".csv":
        return _read_csv(text, path)
    return _read_ledger(text)


def _read_ledger(text: str) -> UsageExport:
    export = UsageExport()
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            export.skipped["unparsable line"] += 1
            continue
        if not isinstance(raw, dict) or raw.get("kind") != "UsageRecord":
            export.skipped["not a usage record"] += 1
            continue
        try:
            record = UsageRecord.model_validate(
                {k: v for k, v in raw.items() if k in _RECORD_FIELDS}
            )
        except ValidationError:
            export.skipped["invalid usage record"] += 1
            continue
        if not record.usage_reported or record.provider is None:
            export.skipped["no reported usage (refused or failed)"] += 1
            continue
        export.calls.append(
            UsedCall(
                time=record.time,
                team=record.team,
                policy=record.policy,
                rule=record.rule,
                provider=record.provider,
                requested_model=record.requested_model,
                tokens=record.tokens,
                **_hints(raw),
                recorded_cost=record.cost_usd,
                tool_calls=dict(record.tool_calls),
            )
        )
    return export


def _hints(raw: dict[str, Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    if raw.get("task") not in (None, ""):
        hints["task"] = str(raw["task"])
    if raw.get("sensitivity") not in (None, ""):
        hints["sensitivity"] = Sensitivity(str(raw["sensitivity"]))
    if raw.get("hasTools") not in (None, ""):
        value = raw["hasTools"]
        hints["has_tools"] = value if isinstance(value, bool) else str(value).lower() == "true"
    return hints


def _read_csv(text: str, path: Path) -> UsageExport:
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in _REQUIRED_CSV if c not in (reader.fieldnames or [])]
    if missing:
        raise ReadError(f"{path}: CSV lacks the columns {', '.join(missing)}")
    export = UsageExport()
    for row in reader:
        try:
            call = UsedCall(
                time=datetime.fromisoformat(row["time"].replace("Z", "+00:00")),
                team=row["team"],
                policy=row["policy"],
                rule=row["rule"],
                provider=Provider(row["provider"]),
                requested_model=row.get("requestedModel") or "",
                tokens=TokenUsage(
                    input=int(row["inputTokens"] or 0),
                    output=int(row["outputTokens"] or 0),
                    cached_input=int(row.get("cachedInputTokens") or 0),
                    cache_creation=int(row.get("cacheCreationTokens") or 0),
                ),
                **_hints(row),
            )
        except (KeyError, ValueError) as error:
            raise ReadError(f"{path}, line {reader.line_num}: {error}") from error
        export.calls.append(call)
    return export
