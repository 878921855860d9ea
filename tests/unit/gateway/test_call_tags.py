"""The gateway fills the fixed attribution tags from the caller's pod labels, bounded, for
its own ledger (the operator replaces them at ingestion)."""

from __future__ import annotations

from costwarden.api.usage import Endpoint, UsageRecord
from costwarden.gateway.call import Call
from costwarden.gateway.identity import Caller
from costwarden.gateway.openai import OPENAI


def record_of(labels: dict[str, str]) -> UsageRecord:
    call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
    call.caller = Caller("sidecar", "ns", "pod", "job", labels)
    call.task, call.sensitivity, call.reason = "t" * 500, "Internal", "r" * 2000
    return call.to_record("replica")


def test_fixed_tags_only_bounded_and_the_record_passes_the_operators_schema():
    labels = {
        "costwarden.io/change": "42",
        "costwarden.io/project": "p" * 63,
        "costwarden.io/costcenter": "not-a-fixed-key",
        **{f"costwarden.io/k{i}": "v" for i in range(40)},
        "app": "web",
    }
    record = record_of(labels)
    assert record.labels == {"change": "42", "project": "p" * 63}
    assert (len(record.task), len(record.route_reason)) == (128, 512)
    # What the operator will parse: the record as the gateway wrote it validates.
    again = UsageRecord.model_validate(record.model_dump(mode="json", by_alias=True))
    assert again.labels == record.labels
    assert record_of({}).labels == {}
