"""Change outcomes from a Git forge's webhook (pure): GitHub's ``pull_request`` event.

GitHub signs every delivery with the webhook's secret: ``X-Hub-Signature-256:
sha256=<hex HMAC-SHA256 of the raw body>``. :func:`verify_github_signature` checks it in
constant time against each configured secret (several during a rotation).

A ``pull_request`` event with ``action: closed`` ends a change: ``pull_request.merged``
true is a merge (at ``merged_at``), false a close without merging (at ``closed_at``).
A merged pull request made with GitHub's "Revert" button (body ``Reverts owner/name#123``
in the same repository) also reports change 123 as reverted. Every other event or action
is no outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from costwarden.api.results import ChangeResult, ResultReport, normalize_repository

GITHUB_SIGNATURE_HEADER = "X-Hub-Signature-256"
GITHUB_EVENT_HEADER = "X-GitHub-Event"
GITHUB_DELIVERY_HEADER = "X-GitHub-Delivery"
_REVERTS = re.compile(r"^\s*Reverts ([A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100})#([0-9]{1,12})\b")


class PayloadError(ValueError):
    """The delivery is signed but does not have the documented shape."""


def github_signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_github_signature(secrets: Iterable[bytes], body: bytes, header: str) -> bool:
    """Whether ``header`` is the HMAC-SHA256 of ``body`` under one of ``secrets``."""
    if not header.startswith("sha256="):
        return False
    given = header.encode()
    found = False
    for secret in secrets:
        # Every secret is compared (no early exit): timing says nothing about which matched.
        found |= hmac.compare_digest(github_signature(secret, body).encode(), given)
    return found


def github_outcomes(event: str, payload: Mapping[str, Any]) -> list[ResultReport]:
    """The outcomes a GitHub delivery reports; [] for anything but a closed pull request."""
    if event != "pull_request" or payload.get("action") != "closed":
        return []
    pr = payload.get("pull_request")
    repository = payload.get("repository")
    if not isinstance(pr, Mapping) or not isinstance(repository, Mapping):
        raise PayloadError("a pull_request event without pull_request or repository")
    full_name = repository.get("full_name")
    number = pr.get("number")
    if not isinstance(full_name, str) or isinstance(number, bool) or not isinstance(number, int):
        raise PayloadError("repository.full_name and pull_request.number are required")
    merged = pr.get("merged") is True
    when = pr.get("merged_at") if merged else pr.get("closed_at")
    try:
        reports = [
            ResultReport(
                repository=full_name,
                change=str(number),
                outcome=ChangeResult.MERGED if merged else ChangeResult.CLOSED,
                time=_time(when),
            )
        ]
        body = pr.get("body")
        match = _REVERTS.match(body) if merged and isinstance(body, str) else None
        if match and normalize_repository(match.group(1)) == normalize_repository(full_name):
            reports.append(
                ResultReport(
                    repository=full_name,
                    change=match.group(2),
                    outcome=ChangeResult.REVERTED,
                    time=_time(when),
                )
            )
    except ValidationError as error:
        raise PayloadError(str(error)[:500]) from error
    return reports


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise PayloadError(f"not a timestamp: {value[:40]!r}") from error


__all__ = [
    "GITHUB_DELIVERY_HEADER",
    "GITHUB_EVENT_HEADER",
    "GITHUB_SIGNATURE_HEADER",
    "PayloadError",
    "github_outcomes",
    "github_signature",
    "verify_github_signature",
]
