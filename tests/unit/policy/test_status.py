from datetime import UTC, datetime, timedelta
from decimal import Decimal

from costwarden.api.catalog import default_catalog
from costwarden.policy.render import ObservedObject, reconcile
from costwarden.policy.status import budget_status, changed_fields

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def verdict_for(spec: dict, status: dict | None = None):
    obj = ObservedObject("ns", "b", 4, spec, status or {})
    return obj, reconcile([obj], [], default_catalog(), NOW).budgets["ns/b"]


def test_conditions_carry_generation_and_reason():
    obj, verdict = verdict_for({"hardCapUSD": 10})
    status = budget_status(verdict, obj.status, 4, Decimal(10), NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == 4
    assert ready["reason"] == "NoRoutingPolicy"
    assert status["phase"] == "Active"
    assert status["spentUSD"] == "0.00"
    assert status["remainingUSD"] == "10.00"


def test_a_second_pass_writes_nothing_and_keeps_transition_times():
    _, verdict = verdict_for({"hardCapUSD": 10})
    first = budget_status(verdict, {}, 4, Decimal(10), NOW)
    later = NOW + timedelta(minutes=5)
    second = budget_status(verdict, first, 4, Decimal(10), later)
    assert changed_fields(second, first) == {}


def test_invalid_budget_reports_the_field_and_phase_invalid():
    _, verdict = verdict_for({"hardCapUSD": 10, "period": {"timeZone": "Nowhere/Land"}})
    status = budget_status(verdict, {}, 4, Decimal(10), NOW)
    assert status["phase"] == "Invalid"
    ready = status["conditions"][0]
    assert ready["status"] == "False"
    assert "spec.period.timeZone" in ready["message"]
