"""The wire format between a gateway and the operator's ingestion endpoint.

A gateway replica (a *source*) numbers every record and loop signal it emits with ``seq``,
strictly increasing per source, and sends them in order in batches (``POST /v1/usage``).
The operator answers with the highest ``seq`` it has durably applied and each touched
team's phase; the gateway then forgets everything up to that ``seq``. A batch that is
refused or lost is re-sent whole: sequence numbers make the second delivery a no-op.
"""

from __future__ import annotations

from pydantic import Field

from costwarden.api.base import WireModel
from costwarden.api.teambudget import BudgetPhase
from costwarden.api.usage import RECORD_API_VERSION, LoopSignal, UsageRecord

BATCH_KIND = "UsageBatch"
ACK_KIND = "UsageBatchAck"
MAX_BATCH_ITEMS = 5000


class BatchItem(WireModel):
    """One numbered entry: a usage record or a loop signal (exactly one of them)."""

    seq: int = Field(ge=1, description="Position in the source's stream (its ledger line).")
    record: UsageRecord | None = None
    loop_signal: LoopSignal | None = None


class UsageBatch(WireModel):
    api_version: str = Field(default=RECORD_API_VERSION, alias="apiVersion")
    kind: str = BATCH_KIND
    source: str = Field(
        min_length=1,
        max_length=253,
        description="The sender's stable id: survives restarts of the same ledger.",
    )
    items: list[BatchItem] = Field(default_factory=list, max_length=MAX_BATCH_ITEMS)


class HeldEntry(WireModel):
    seq: int
    team: str
    reason: str = ""


class BatchAck(WireModel):
    api_version: str = Field(default=RECORD_API_VERSION, alias="apiVersion")
    kind: str = ACK_KIND
    source: str
    acked_seq: int = Field(description="Everything up to this seq is applied (or was before).")
    teams: dict[str, BudgetPhase] = Field(
        default_factory=dict,
        description="Phase of every team the batch touched, after applying it.",
    )
    records: int = 0
    duplicates: int = 0
    applied_through: int = Field(
        default=0,
        description="Every entry up to this seq is applied except those listed in held (set "
        "only when held is not empty; ackedSeq then stops below the first held entry, so a "
        "gateway that does not know held re-sends them, never drops them).",
    )
    held: list[HeldEntry] = Field(
        default_factory=list,
        description="Entries not applied because their team's books cannot be written for a "
        "reason a re-send does not cure (e.g. the API server refuses the status, 422): the "
        "gateway keeps them (its ledger), holds back that team's later entries behind them, "
        "and re-sends them until they apply. Other teams' entries are applied meanwhile.",
    )
