"""The accounting part of TeamBudget.status: spend by model and job, results, history, cursors.

These fields are written by the operator's accounting (``costwarden.accounting``), one
resourceVersion-guarded status patch per applied usage batch; the reconciler writes phase,
conditions, remainingUSD, usedPercent and observedGeneration. docs/accounting.md tells
the whole design.

Amounts here are exact (``ExactAmount``): a call often costs less than a micro-dollar, and
a sum of rounded amounts drifts. ``spentUSD`` (``StatusMoney``, six decimals, rounded down) is
for display and for the CRD's printer column; ``spentExactUSD`` carries every digit.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema

from costwarden.api.base import WireModel
from costwarden.api.money import StatusMoney
from costwarden.api.results import ChangeResult

MAX_MODELS = 32
MAX_JOBS = 50
MAX_HISTORY = 6
MAX_CURSORS = 128
MAX_LEASES = 128

EXACT_PATTERN = r"^[0-9]{1,30}([.][0-9]{1,18})?$"
"""30 integer digits: beyond any spend a team can reach (see money.StatusMoney)."""


def parse_exact(value: Any) -> Decimal:
    """An exact, non-negative amount: int, Decimal or decimal string; never a float."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError("must be a decimal string or an integer, never a float")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a finite, non-negative amount")
    return amount


def format_exact(value: Decimal) -> str:
    """Every digit, no exponent, no trailing zeros (``"0.000008925"``, ``"12"``)."""
    if not value:
        return "0"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


ExactAmount = Annotated[
    Decimal,
    BeforeValidator(parse_exact),
    PlainSerializer(format_exact, return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "maxLength": 49, "pattern": EXACT_PATTERN},
    ),
]
"""USD with every digit (up to 18 decimals) as a decimal string."""


class JobOutcome(StrEnum):
    """How an agent Job ended, for cost per result."""

    SUCCEEDED = "Succeeded"
    """The Job completed (condition Complete)."""
    FAILED = "Failed"
    """The Job failed (condition Failed) without costwarden stopping it."""
    STOPPED_BY_COSTWARDEN = "StoppedByCostwarden"
    """costwarden deleted the Job, or it was still suspended by costwarden when it was
    deleted or when the period closed."""


class TokenUsage(WireModel):
    """Tokens counted in a period, by kind."""

    input: int = Field(default=0, ge=0, description="Input tokens not served from a cache.")
    output: int = Field(default=0, ge=0, description="Output tokens.")
    cached_input: int = Field(default=0, ge=0, description="Input tokens read from a prompt cache.")
    cache_creation: int = Field(
        default=0,
        ge=0,
        description="Input tokens written to a prompt cache (Anthropic: 5-minute entries).",
    )
    cache_creation_1h: int = Field(
        default=0,
        ge=0,
        alias="cacheCreation1h",
        description="Input tokens written to Anthropic's 1-hour prompt cache (billed at "
        "their own rate; not counted in cacheCreation).",
    )

    def total(self) -> int:
        return (
            self.input
            + self.output
            + self.cached_input
            + self.cache_creation
            + self.cache_creation_1h
        )

    def prompt(self) -> int:
        """Every input token, whatever it was billed as."""
        return self.input + self.cached_input + self.cache_creation + self.cache_creation_1h

    def plus(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input=self.input + other.input,
            output=self.output + other.output,
            cached_input=self.cached_input + other.cached_input,
            cache_creation=self.cache_creation + other.cache_creation,
            cache_creation_1h=self.cache_creation_1h + other.cache_creation_1h,
        )


class ModelSpend(WireModel):
    """Spend on one served model in the current period."""

    model: Annotated[str, Field(max_length=128)] = Field(description="Served model name.")
    spent_usd: ExactAmount = Field(alias="spentUSD", description="Exact spend.")
    tokens: int = Field(default=0, ge=0, description="Input plus output tokens.")
    requests: int = Field(default=0, ge=0, description="Calls that reported usage.")


class JobSpend(WireModel):
    """Spend of one agent Job in the current period."""

    namespace: Annotated[str, Field(max_length=63)]
    name: Annotated[str, Field(max_length=253)]
    spent_usd: ExactAmount = Field(alias="spentUSD", description="Exact spend.")
    tokens: int = Field(default=0, ge=0, description="Input plus output tokens.")
    requests: int = Field(default=0, ge=0)
    outcome: JobOutcome | None = Field(
        default=None, description="Set once the Job finished; absent while it runs."
    )


class JobBreakdown(WireModel):
    """Spend by Job, bounded: the largest jobs by name, the rest summed."""

    jobs: list[JobSpend] = Field(
        default_factory=list,
        max_length=MAX_JOBS,
        description=f"At most {MAX_JOBS} jobs: running ones first, then by spend.",
    )
    other_usd: ExactAmount = Field(
        default=Decimal(0),
        alias="otherUSD",
        description="Spend of jobs not listed (and of calls outside any Job).",
    )


class OutcomeTally(WireModel):
    jobs: int = Field(default=0, ge=0, description="Finished Jobs with this outcome.")
    spent_usd: ExactAmount = Field(
        default=Decimal(0), alias="spentUSD", description="Their spend in this period."
    )


class Results(WireModel):
    """Finished agent Jobs by outcome, so cost per result and wasted spend can be read."""

    succeeded: OutcomeTally = Field(default_factory=OutcomeTally)
    failed: OutcomeTally = Field(default_factory=OutcomeTally)
    stopped_by_costwarden: OutcomeTally = Field(default_factory=OutcomeTally)
    cost_per_succeeded_job_usd: ExactAmount | None = Field(
        default=None,
        alias="costPerSucceededJobUSD",
        description="Spend of succeeded Jobs divided by their number (6 decimals).",
    )
    wasted_usd: ExactAmount = Field(
        default=Decimal(0),
        alias="wastedUSD",
        description="Spend of failed Jobs plus Jobs stopped by costwarden.",
    )
    last_finish: datetime | None = Field(
        default=None,
        description="Finish time of the last Job counted (a re-listed Job is not counted twice).",
    )


class ClosedPeriod(WireModel):
    """A finished period, kept in a short history."""

    start: datetime
    end: datetime
    spent_usd: StatusMoney = Field(
        alias="spentUSD", description="Spend, rounded down to 6 decimals."
    )
    spent_exact_usd: ExactAmount = Field(alias="spentExactUSD")
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    results: Results = Field(default_factory=Results)
    changes: Changes | None = Field(
        default=None,
        description="Changes by repository and outcome at the period's end (without the "
        "per-change list).",
    )


class SourceCursor(WireModel):
    """The highest sequence number applied from one usage source (a gateway's ledger)."""

    source: Annotated[str, Field(max_length=1024)] = Field(
        description="<reporter>#<source id>: the authenticated reporter (pod:<ns>/<name>/<uid>, "
        "sa:<ns>/<name> or token:shared) and the stream it numbers."
    )
    seq: int = Field(ge=0)
    last_seen: datetime


class Ingestion(WireModel):
    """De-duplication state, as durable as the totals it guards."""

    cursors: list[SourceCursor] = Field(
        default_factory=list,
        max_length=MAX_CURSORS,
        description="Per usage source: records with seq at or below are already counted.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["source"],
        },
    )
    records: int = Field(default=0, ge=0, description="Records applied in this period.")
    duplicates: int = Field(default=0, ge=0, description="Records seen again and ignored.")
    late_records: int = Field(
        default=0, ge=0, description="Records of an earlier, no longer kept period (ignored)."
    )
    last_applied: datetime | None = Field(default=None, description="Last batch applied.")


class LeaseHolder(WireModel):
    """A share of the team's remaining budget lent to one gateway replica (a usage source).

    The replica reserves its calls against it locally; the operator counts it as spent
    until the replica's usage is applied (which moves money from the lease to spend) or
    the lease expires unrenewed (reclaimed). docs/gateway.md, "Leases"."""

    holder: Annotated[str, Field(max_length=1024)] = Field(
        description="<reporter>#<source id>, the same key as the replica's usage cursor."
    )
    leased_usd: ExactAmount = Field(
        alias="leasedUSD", description="What the replica may still spend before asking again."
    )
    in_use_usd: ExactAmount = Field(
        default=Decimal(0),
        alias="inUseUSD",
        description="Of it, held by calls in flight and usage metered but not yet applied "
        "(as the replica last reported).",
    )
    renewed: datetime = Field(description="When the replica last asked or renewed.")


class Leases(WireModel):
    """Budget lent to gateway replicas, and whether a call has been refused at the cap."""

    leased_usd: ExactAmount = Field(
        default=Decimal(0), alias="leasedUSD", description="Sum of every holder's lease."
    )
    holders: list[LeaseHolder] = Field(
        default_factory=list,
        max_length=MAX_LEASES,
        description="One entry per gateway replica holding a lease.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["holder"],
        },
    )
    refused_need_usd: ExactAmount | None = Field(
        default=None,
        alias="refusedNeedUSD",
        description="The smallest worst case (at the policy's default output ceiling) of a "
        "call refused this period because the budget left could not hold it: the hard cap "
        "counts as reached while spend plus this exceeds it.",
    )


MAX_CHANGES = 100
MAX_REPOSITORIES = 32
OTHER_REPOSITORY = "_other"
"""The repository bucket of changes once MAX_REPOSITORIES repositories are listed."""


class ChangeTally(WireModel):
    changes: int = Field(default=0, ge=0, description="Changes with this outcome.")
    spent_usd: ExactAmount = Field(
        default=Decimal(0), alias="spentUSD", description="Their spend in this period."
    )


class RepositoryChanges(WireModel):
    """Spend on one repository's changes (the ``repository`` and ``change`` tags), by outcome."""

    repository: Annotated[str, Field(max_length=200)] = Field(
        description=f"owner/name (lower case); {OTHER_REPOSITORY} sums repositories beyond "
        f"the first {MAX_REPOSITORIES}."
    )
    merged: ChangeTally = Field(default_factory=ChangeTally)
    closed: ChangeTally = Field(
        default_factory=ChangeTally, description="Closed without merging: never merged."
    )
    reverted: ChangeTally = Field(default_factory=ChangeTally, description="Merged, then reverted.")
    open_usd: ExactAmount = Field(
        default=Decimal(0),
        alias="openUSD",
        description="Spend on changes with no outcome reported yet.",
    )
    cost_per_merged_change_usd: ExactAmount | None = Field(
        default=None,
        alias="costPerMergedChangeUSD",
        description="Spend of merged changes divided by their number (18 decimals).",
    )


class ChangeSpend(WireModel):
    """Spend carrying one change's tag in the current period."""

    repository: Annotated[str, Field(max_length=200)]
    change: Annotated[str, Field(max_length=63)]
    spent_usd: ExactAmount = Field(alias="spentUSD")
    requests: int = Field(default=0, ge=0)
    outcome: ChangeResult | None = Field(
        default=None, description="merged, closed or reverted once reported."
    )
    ended: datetime | None = Field(default=None, description="When the outcome happened.")


class Changes(WireModel):
    """Cost per result beyond Jobs: spend tagged with a change, joined to the outcome CI or
    a Git forge reported for it (docs/attribution.md)."""

    by_repository: list[RepositoryChanges] = Field(
        default_factory=list,
        max_length=MAX_REPOSITORIES,
        description="Per repository: changes by outcome, spend, cost per merged change.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["repository"],
        },
    )
    changes: list[ChangeSpend] = Field(
        default_factory=list,
        max_length=MAX_CHANGES,
        description=f"At most {MAX_CHANGES} changes: open ones first, then by spend.",
    )
    cost_per_merged_change_usd: ExactAmount | None = Field(
        default=None,
        alias="costPerMergedChangeUSD",
        description="All repositories: spend of merged changes divided by their number.",
    )
    never_merged_usd: ExactAmount = Field(
        default=Decimal(0),
        alias="neverMergedUSD",
        description="Spend on changes closed without merging.",
    )
    reverted_usd: ExactAmount = Field(
        default=Decimal(0), alias="revertedUSD", description="Spend on changes later reverted."
    )


ClosedPeriod.model_rebuild()
