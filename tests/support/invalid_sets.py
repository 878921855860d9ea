"""The broken manifest *sets* (tests/manifests/invalid-sets): mistakes only visible across
objects or to the operator (not to the API server's schema), one mistake per file.

Headers: ``# object: Kind name``, ``# field:``, ``# message:`` (``{namespace}`` stands for
the namespace the set is applied in) and ``# operator:``, the Ready condition reason the
operator reports, or ``none`` when only ``costwarden validate`` can see the mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INVALID_SETS_DIR = ROOT / "tests" / "manifests" / "invalid-sets"


@dataclass(frozen=True)
class BrokenSet:
    path: Path
    kind: str
    name: str
    field: str
    message: str
    operator_reason: str

    @property
    def id(self) -> str:
        return self.path.stem

    def message_in(self, namespace: str) -> str:
        return self.message.replace("{namespace}", namespace)


def _header(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep and key in ("object", "field", "message", "operator"):
            fields[key] = value.strip()
    return fields


def broken_sets() -> list[BrokenSet]:
    cases = []
    for path in sorted(INVALID_SETS_DIR.glob("*.yaml")):
        header = _header(path.read_text())
        kind, name = header["object"].split()
        cases.append(
            BrokenSet(
                path=path,
                kind=kind,
                name=name,
                field=header["field"],
                message=header["message"],
                operator_reason=header["operator"],
            )
        )
    return cases
