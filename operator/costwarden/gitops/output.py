"""How validation findings are printed: for a person, for a program, for GitHub Actions."""

from __future__ import annotations

import json
from enum import StrEnum

from costwarden.gitops.validate import Finding, Report


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    GITHUB = "github"


def render_report(report: Report, output: OutputFormat) -> str:
    if output is OutputFormat.JSON:
        return as_json(report)
    if output is OutputFormat.GITHUB:
        return as_github(report)
    return as_text(report)


def as_text(report: Report) -> str:
    lines = [
        f"{f.source}:{f.line}: document {f.object.document.index + 1}: "
        f"{f.object.ref or '(unnamed)'}: {f.problem.field}: {f.problem.message}"
        for f in report.findings
    ]
    lines.append(_summary(report))
    return "\n".join(lines) + "\n"


def _summary(report: Report) -> str:
    count = len(report.objects)
    objects = f"{count} costwarden object{'' if count == 1 else 's'}"
    if report.valid:
        return f"valid: {objects}"
    problems = len(report.findings)
    return f"invalid: {problems} problem{'' if problems == 1 else 's'} in {objects}"


def finding_json(finding: Finding) -> dict[str, object]:
    obj = finding.object
    return {
        "file": finding.source,
        "line": finding.line,
        "document": obj.document.index + 1,
        "kind": obj.kind,
        "namespace": obj.namespace,
        "name": obj.name,
        "field": finding.problem.field,
        "message": finding.problem.message,
        "reason": str(finding.problem.reason),
    }


def as_json(report: Report) -> str:
    document = {
        "valid": report.valid,
        "objects": [
            {
                "file": o.document.source,
                "document": o.document.index + 1,
                "kind": o.kind,
                "namespace": o.namespace,
                "name": o.name,
            }
            for o in report.objects
        ],
        "problems": [finding_json(f) for f in report.findings],
    }
    return json.dumps(document, indent=2) + "\n"


def as_github(report: Report) -> str:
    """Workflow commands GitHub Actions turns into annotations on the pull request's lines."""
    lines = []
    for f in report.findings:
        properties = ",".join(
            f"{key}={_escape_property(value)}"
            for key, value in (
                ("file", f.source),
                ("line", str(f.line)),
                ("title", f"{f.object.ref}: {f.problem.field}"),
            )
        )
        lines.append(f"::error {properties}::{_escape_data(f.problem.message)}")
    lines.append(_summary(report))
    return "\n".join(lines) + "\n"


def _escape_data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(value: str) -> str:
    return _escape_data(value).replace(":", "%3A").replace(",", "%2C")
