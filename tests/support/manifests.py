"""The table of broken manifests (tests/manifests/invalid), shared by the unit tests (the
pydantic models and offline validation) and the integration tests (the real API server),
so both are held to the same verdict on the same files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
INVALID_DIR = ROOT / "tests" / "manifests" / "invalid"
EXAMPLES_DIR = ROOT / "examples"


@dataclass(frozen=True)
class BrokenManifest:
    path: Path
    document: dict[str, Any]
    field: str
    message: str
    python_message: str

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def kind(self) -> str:
        return str(self.document["kind"])


def _header(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep and key in ("field", "message", "python-message"):
            fields[key] = value.strip()
    return fields


def broken_manifests() -> list[BrokenManifest]:
    cases = []
    for path in sorted(INVALID_DIR.glob("*.yaml")):
        text = path.read_text()
        header = _header(text)
        cases.append(
            BrokenManifest(
                path=path,
                document=yaml.safe_load(text),
                field=header["field"],
                message=header["message"],
                python_message=header.get("python-message", header["message"]),
            )
        )
    return cases


def example_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents
