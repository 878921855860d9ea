"""Cross-field rules, written once and enforced twice: by the API server and in Python.

Each rule carries its CEL expression (emitted into the CRD as ``x-kubernetes-validations``,
so the API server refuses a bad object) and a Python predicate (run by the pydantic model,
so ``costwarden validate`` and the operator reach the same verdict offline). Message, field
path and reason are shared, so both say the same thing; tests apply a table of bad
manifests to the real API server and to the models and compare the verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CelRule:
    """One validation rule: the CEL the API server runs and the Python twin of it."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None
    reason: str | None = None

    def to_schema(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry of the CRD schema."""
        entry = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        if self.reason:
            entry["reason"] = self.reason
        return entry
