"""Outcomes of changes (pull requests, tickets): what CI or a Git forge reports.

Cost per result beyond Jobs: spend carries a ``change`` tag (and a ``repository`` tag) from
the pod that made the call (docs/attribution.md); CI or a forge reports how that change
ended, and the operator joins the two: cost per merged change by repository and team, and
the spend on changes that never merged.

:class:`ChangeOutcome` is the row every consumer reads (TeamBudget status, the usage
store, ``costwarden report``): exactly the columns repository, change, outcome, time,
source. :class:`ResultReport` is the body of ``POST /v1/results``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field

from costwarden.api.base import WireModel

RESULTS_AUDIENCE = "costwarden.io/results"
"""Audience of the service-account tokens a CI job presents to ``POST /v1/results``: useless
against the API server, the gateway and usage ingestion."""
MAX_REPOSITORY = 200
"""owner/name on GitHub is at most 39 + 1 + 100 characters; GitLab groups nest deeper."""
MAX_CHANGE = 63
"""A change is a pull-request number or a ticket id: it is also a label value (63)."""


class ChangeResult(StrEnum):
    """How a change ended."""

    MERGED = "merged"
    """Merged into its target branch: the spend bought a result."""
    CLOSED = "closed"
    """Closed without being merged: the spend bought nothing that shipped."""
    REVERTED = "reverted"
    """Merged, then reverted: the spend bought a result that was undone."""


def normalize_repository(value: str) -> str:
    """``owner/name`` compared without case (GitHub and GitLab names are case-insensitive)
    and without a trailing ``.git`` or slashes, so a tag and a forge's full_name agree."""
    text = value.strip().strip("/").lower()
    return text[:-4] if text.endswith(".git") else text


def normalize_change(value: str) -> str:
    """A change id without a leading ``#`` (``#123`` and ``123`` are one pull request)."""
    return value.strip().lstrip("#")


def _printable(value: str) -> str:
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must hold printable characters only")
    return value


Repository = Annotated[
    str,
    Field(max_length=MAX_REPOSITORY),
    AfterValidator(_printable),
    AfterValidator(normalize_repository),
]
Change = Annotated[
    str,
    Field(min_length=1, max_length=MAX_CHANGE),
    AfterValidator(_printable),
    AfterValidator(normalize_change),
]


class ChangeOutcome(WireModel):
    """One change's outcome as the operator stored it."""

    repository: Repository = Field(
        description="owner/name of the repository (lower case); empty for a ticket that "
        "belongs to none."
    )
    change: Change = Field(description="The pull-request number or ticket id, without '#'.")
    outcome: ChangeResult
    time: datetime = Field(description="When the change ended (merge or close time, UTC).")
    source: Annotated[str, Field(max_length=256)] = Field(
        description="Who reported it: github-webhook, token:results, sa:<namespace>/<name>."
    )


class ResultReport(WireModel):
    """The body of ``POST /v1/results`` (what ``costwarden result`` sends)."""

    repository: Repository = ""
    change: Change
    outcome: ChangeResult
    time: datetime | None = Field(
        default=None, description="When the change ended; the operator's clock if absent."
    )

    def stamped(self, source: str, now: datetime) -> ChangeOutcome:
        when = self.time or now
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return ChangeOutcome(
            repository=self.repository,
            change=self.change,
            outcome=self.outcome,
            time=when.astimezone(UTC),
            source=source,
        )


__all__ = [
    "MAX_CHANGE",
    "MAX_REPOSITORY",
    "RESULTS_AUDIENCE",
    "ChangeOutcome",
    "ChangeResult",
    "ResultReport",
    "normalize_change",
    "normalize_repository",
]
