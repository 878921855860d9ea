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


def _usage_applied(status: dict) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == "UsageApplied"), None)


def test_usage_applied_is_absent_until_a_hold_false_while_held_true_once_applied():
    from costwarden.accounting.held import HeldSummary

    _, verdict = verdict_for({"hardCapUSD": 10})
    never = budget_status(verdict, {}, 4, Decimal(10), NOW, HeldSummary())
    assert _usage_applied(never) is None  # no hold ever: no condition, no write

    held = HeldSummary(entries=7, sources=1, reason="http_422", message="spentUSD: too long")
    during = budget_status(verdict, never, 4, Decimal(10), NOW, held)
    condition = _usage_applied(during)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "UsageHeld")
    assert "7 usage entries from a gateway" in condition["message"]
    assert "http_422" in condition["message"]
    assert "spentUSD: too long" in condition["message"]

    unknown = budget_status(verdict, during, 4, Decimal(10), NOW, None)  # another leader
    assert _usage_applied(unknown) == condition  # left as written

    later = NOW + timedelta(minutes=1)
    after = budget_status(verdict, during, 4, Decimal(10), later, HeldSummary())
    cleared = _usage_applied(after)
    assert cleared is not None
    assert (cleared["status"], cleared["reason"]) == ("True", "UsageApplied")
    assert cleared["lastTransitionTime"] == "2026-11-25T12:01:00Z"
