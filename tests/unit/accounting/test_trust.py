"""Ingestion recomputes what it can: team, job, cost, model, token bounds, time, loop action."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from costwarden.accounting.books import Books
from costwarden.accounting.ledger import Entry, apply_entries
from costwarden.accounting.trust import (
    MAX_RECORD_TOKENS,
    Check,
    PodFacts,
    Refusal,
    Reporter,
    check_record,
    check_signal,
    current_prices,
    owner_job,
    pod_facts,
)
from costwarden.api.gatewayconfig import (
    GatewayConfig,
    ModelRoute,
    PolicyConfig,
    ResolvedPricing,
    ResolvedTierPricing,
    SpendState,
    TeamConfig,
)
from costwarden.api.meta import LabelSelector
from costwarden.api.teambudget import JobAction, LoopDetection, Period, TokenUsage
from costwarden.api.usage import Endpoint, LoopKind, LoopSignal, Outcome, UsageRecord
from costwarden.controllers.ingest_trust import PriceMemory

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
CREATED = NOW - timedelta(minutes=10)
PRICES = ResolvedPricing(
    input_per_m_tok_usd=Decimal("0.15"),
    output_per_m_tok_usd=Decimal("0.60"),
    cached_input_per_m_tok_usd=Decimal("0.075"),
    cache_write_per_m_tok_usd=Decimal("0.15"),
)
TOKENS = TokenUsage(input=10, output=5, cached_input=2)
COST = Decimal("0.000004650")  # 10*0.15 + 5*0.60 + 2*0.075 = 4.65 per million


def team(team_id: str, namespace: str, selector: dict[str, str] | None = None,
         action: JobAction = JobAction.SUSPEND) -> TeamConfig:  # fmt: skip
    return TeamConfig(
        id=team_id, namespaces=[namespace],
        selector=LabelSelector(match_labels=selector) if selector else None,
        period=Period(), hard_cap_usd=Decimal(10), soft_limit_usd=Decimal(8),
        loop_detection=LoopDetection(action=action), routing_policy="platform/policy",
        spend=SpendState(period_start=NOW, period_end=NOW + timedelta(days=1)),
    )  # fmt: skip


def config(prices: ResolvedPricing = PRICES) -> GatewayConfig:
    route = ModelRoute(
        name="mini", provider="OpenAI", endpoint="http://upstream", upstream_model="gpt-4o-mini",
        locality="External", pricing=prices,
    )  # fmt: skip
    return GatewayConfig(
        teams=[
            team("shared/alpha", "shared", {"team": "alpha"}),
            team("shared/beta", "shared", {"team": "beta"}, JobAction.DELETE),
            team("victim/budget", "victim"),
        ],
        policies=[PolicyConfig(id="platform/policy", models=[route], default_model="mini")],
        revision="r1",
    )


SIDECAR = Reporter("pod:shared/agent-0/uid-1", namespace="shared", pod="agent-0", pod_uid="uid-1")
GATEWAY = Reporter("sa:costwarden/gateway")
POD = PodFacts("shared", "agent-0", "uid-1", {"team": "alpha"}, job="nightly", created=CREATED)


def record(**kw) -> UsageRecord:
    fields = dict(
        time=NOW, team="shared/alpha", namespace="shared", pod="agent-0", job="nightly",
        endpoint=Endpoint.CHAT_COMPLETIONS, served_model="mini", tokens=TOKENS,
        usage_reported=True, cost_usd=COST, outcome=Outcome.OK, caller="sidecar",
    )  # fmt: skip
    fields.update(kw)
    return UsageRecord(**fields)


def signal(**kw) -> LoopSignal:
    fields = dict(
        time=NOW, team="shared/alpha", namespace="shared", pod="agent-0", job="nightly",
        loop=LoopKind.IDENTICAL_REQUESTS, count=5, action=JobAction.SUSPEND,
    )  # fmt: skip
    fields.update(kw)
    return LoopSignal(**fields)


def check(reporter: Reporter = SIDECAR, pod: PodFacts | None = POD, cfg=None) -> Check:
    cfg = cfg or config()
    return Check(reporter, cfg, NOW, current_prices(cfg), pod)


def test_an_honest_record_is_accepted_with_the_recomputed_team_job_and_cost():
    checked = check_record(1, record(), check())
    assert checked.refusal is None
    assert checked.team == "shared/alpha"
    assert checked.record is not None
    assert checked.record.cost_usd == COST
    assert checked.record.job == "nightly"


def test_the_team_comes_from_the_pods_labels_never_from_the_record():
    checked = check_record(1, record(team="shared/beta"), check())
    assert checked.refusal is Refusal.TEAM_MISMATCH
    assert "belongs to shared/alpha, not to shared/beta" in checked.message
    # A trusted gateway naming another namespace's budget is refused all the same.
    checked = check_record(1, record(team="victim/budget"), check(GATEWAY))
    assert checked.refusal is Refusal.TEAM_MISMATCH


def test_a_sidecar_reports_its_own_pod_only_and_the_uid_must_match():
    assert check_record(1, record(pod="other"), check()).refusal is Refusal.FOREIGN_POD
    assert check_record(1, record(namespace="victim"), check()).refusal is Refusal.FOREIGN_POD
    recreated = PodFacts("shared", "agent-0", "uid-2", {"team": "alpha"}, "nightly", CREATED)
    assert check_record(1, record(), check(pod=recreated)).refusal is Refusal.POD_UNKNOWN
    assert check_record(1, record(), check(pod=None)).refusal is Refusal.POD_UNKNOWN


def test_the_job_is_the_pods_owner_job():
    assert check_record(1, record(job="other"), check()).refusal is Refusal.JOB_MISMATCH
    bare = PodFacts("shared", "agent-0", "uid-1", {"team": "alpha"}, job="", created=CREATED)
    assert check_record(1, record(), check(pod=bare)).refusal is Refusal.JOB_MISMATCH
    assert check_record(1, record(job=""), check(pod=bare)).refusal is None


@pytest.mark.parametrize("cost", ["0.01", "0.000004649", "0", "0.0000046501"])
def test_a_cost_that_is_not_price_times_tokens_is_refused(cost: str):
    checked = check_record(1, record(cost_usd=Decimal(cost)), check())
    assert checked.refusal is Refusal.COST_MISMATCH
    assert "cost 0.00000465 USD at the policy's prices" in checked.message


def test_equal_decimals_in_another_notation_are_the_same_cost():
    assert check_record(1, record(cost_usd=Decimal("0.00000465")), check()).refusal is None


def test_a_call_without_reported_usage_costs_nothing():
    free = record(usage_reported=False, cost_usd=Decimal(0), outcome=Outcome.REFUSED)
    assert check_record(1, free, check()).refusal is None
    priced = record(usage_reported=False, cost_usd=Decimal("1"), outcome=Outcome.REFUSED)
    assert check_record(1, priced, check()).refusal is Refusal.COST_MISMATCH


def test_a_served_model_outside_the_teams_policy_is_refused():
    checked = check_record(1, record(served_model="frontier"), check())
    assert checked.refusal is Refusal.MODEL_NOT_IN_POLICY


def test_tokens_are_bounded_per_record():
    huge = TokenUsage(input=MAX_RECORD_TOKENS, output=1)
    checked = check_record(1, record(tokens=huge, cost_usd=Decimal(0)), check())
    assert checked.refusal is Refusal.TOKENS_OUT_OF_BOUNDS


@pytest.mark.parametrize(
    ("moment", "reporter", "ok"),
    [
        (NOW + timedelta(minutes=4), SIDECAR, True),
        (NOW + timedelta(minutes=6), SIDECAR, False),  # the future
        (CREATED - timedelta(seconds=30), SIDECAR, True),  # clock skew
        (CREATED - timedelta(minutes=2), SIDECAR, False),  # before the pod existed
        (NOW - timedelta(days=3), GATEWAY, False),  # a gateway's pod still bounds it
    ],
)
def test_time_is_bounded_to_a_window_around_now(moment, reporter, ok):
    checked = check_record(1, record(time=moment), check(reporter))
    assert (checked.refusal is None) is ok
    if not ok:
        assert checked.refusal is Refusal.TIME_OUT_OF_WINDOW


def test_a_sidecar_record_older_than_an_hour_is_refused_a_gateways_is_not():
    old_pod = PodFacts("shared", "agent-0", "uid-1", {"team": "alpha"}, "nightly",
                       NOW - timedelta(days=5))  # fmt: skip
    moment = NOW - timedelta(hours=2)
    assert check_record(1, record(time=moment), check(pod=old_pod)).refusal is (
        Refusal.TIME_OUT_OF_WINDOW
    )
    assert check_record(1, record(time=moment), check(GATEWAY, old_pod)).refusal is None


def test_per_team_key_callers_of_a_trusted_gateway_keep_the_keys_team():
    keyed = record(caller="key", pod="", job="", namespace="victim", team="victim/budget")
    assert check_record(1, keyed, check(GATEWAY, pod=None)).team == "victim/budget"
    elsewhere = record(caller="key", pod="", job="", namespace="shared", team="victim/budget")
    assert check_record(1, elsewhere, check(GATEWAY, pod=None)).refusal is Refusal.TEAM_MISMATCH
    # A sidecar cannot claim to be a key caller.
    assert check_record(1, keyed, check(pod=None)).refusal is Refusal.FOREIGN_POD


def test_loop_signals_act_on_the_pods_own_job_with_the_budgets_action():
    accepted = check_signal(1, signal(), check())
    assert accepted.signal is not None
    assert (accepted.signal.job, accepted.signal.action) == ("nightly", JobAction.SUSPEND)
    assert check_signal(1, signal(job="victim-job"), check()).refusal is Refusal.JOB_MISMATCH
    delete = check_signal(1, signal(action=JobAction.DELETE), check())
    assert delete.refusal is Refusal.ACTION_MISMATCH
    assert "sets loopDetection.action Suspend" in delete.message
    other = check_signal(1, signal(namespace="victim", pod="x"), check())
    assert other.refusal is Refusal.FOREIGN_POD


def test_unattributed_records_are_accepted_only_when_free():
    cfg = config()
    stray = PodFacts("shared", "agent-0", "uid-1", {"team": "nobody"}, "nightly", CREATED)
    free = record(team="", usage_reported=False, cost_usd=Decimal(0), outcome=Outcome.REFUSED)
    checked = check_record(1, free, check(pod=stray, cfg=cfg))
    assert checked.refusal is None
    assert checked.team == ""
    assert check_record(1, record(team=""), check(pod=stray)).refusal is Refusal.TEAM_MISMATCH


def test_owner_job_reads_owner_references_not_labels():
    pod = {
        "metadata": {
            "name": "p", "namespace": "ns", "uid": "u",
            "labels": {"batch.kubernetes.io/job-name": "forged"},
            "creationTimestamp": "2026-11-25T11:50:00Z",
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "real", "uid": "j",
                 "controller": True},
            ],
        }
    }  # fmt: skip
    assert owner_job(pod) == "real"
    assert pod_facts(pod).created == CREATED
    pod["metadata"]["ownerReferences"][0]["controller"] = False  # type: ignore[index]
    assert owner_job(pod) == ""


def test_recent_prices_are_remembered_so_a_price_change_does_not_refuse_in_flight_records():
    clock = [0.0]
    memory = PriceMemory(keep=600, clock=lambda: clock[0])
    memory.observe(config())
    raised = PRICES.model_copy(update={"output_per_m_tok_usd": Decimal("1.20")})
    new = config(raised).model_copy(update={"revision": "r2"})
    clock[0] = 1.0
    memory.observe(new)
    alpha = new.team("shared/alpha")
    assert alpha is not None
    assert memory.prices(alpha, "mini") == [raised, PRICES]
    after = Check(SIDECAR, new, NOW, memory.prices, POD)
    assert check_record(1, record(), after).refusal is None  # priced at the old prices
    clock[0] = 601.0  # ten minutes later the old prices are forgotten
    assert memory.prices(alpha, "mini") == [raised]
    assert check_record(1, record(), after).refusal is Refusal.COST_MISMATCH


def test_cursors_are_keyed_by_reporter_and_legacy_cursors_are_taken_over():
    books = Books(start=NOW - timedelta(days=1), end=NOW + timedelta(days=1))
    legacy = apply_entries(books, "gw-1/abcd", [Entry(5, record())], NOW)
    assert legacy.records
    assert books.cursors["gw-1/abcd"].seq == 5
    key = GATEWAY.cursor_key("gw-1/abcd")
    again = apply_entries(books, key, [Entry(5, record()), Entry(6, record())], NOW,
                          legacy="gw-1/abcd")  # fmt: skip
    assert (again.duplicates, len(again.records)) == (1, 1)
    assert set(books.cursors) == {key}
    # Another reporter's cursor of the same source id is its own: it advances nothing else.
    attacker = SIDECAR.cursor_key("gw-1/abcd")
    apply_entries(books, attacker, [Entry(2**62, record())], NOW, legacy="gw-1/abcd")
    assert books.cursors[key].seq == 6
    assert books.cursors[attacker].seq == 2**62
    assert len(apply_entries(books, key, [Entry(7, record())], NOW).records) == 1


def test_provider_run_tool_calls_are_priced_into_the_recomputed_cost():
    """A Responses API call with two web searches: the cost the operator recomputes includes
    them at the policy's per-call price; the tokens' cost alone is a mismatch."""
    prices = PRICES.model_copy(update={"tool_call_usd": {"web_search_call": Decimal("0.01")}})
    cfg = config(prices)
    calls = {"web_search_call": 2}
    honest = record(endpoint=Endpoint.RESPONSES, tool_calls=calls, cost_usd=COST + Decimal("0.02"))
    tokens_only = record(endpoint=Endpoint.RESPONSES, tool_calls=calls, cost_usd=COST)

    checked = check_record(1, honest, check(cfg=cfg))
    assert checked.refusal is None
    assert checked.record is not None
    assert checked.record.cost_usd == COST + Decimal("0.02")
    assert check_record(2, tokens_only, check(cfg=cfg)).refusal is Refusal.COST_MISMATCH


def test_tool_calls_are_bounded_per_record():
    from costwarden.accounting.trust import MAX_RECORD_TOOL_CALLS

    claim = record(tool_calls={"web_search_call": MAX_RECORD_TOOL_CALLS + 1})
    assert check_record(1, claim, check()).refusal is Refusal.TOKENS_OUT_OF_BOUNDS


# -- attribution tags (issue 14) -------------------------------------------------------------


def test_tags_are_recomputed_from_the_pod_never_taken_from_the_record():
    tagged = PodFacts(
        "shared", "agent-0", "uid-1", {"team": "alpha", "costwarden.io/change": "7"},
        job="nightly", created=CREATED,
        annotations={"costwarden.io/repository": "acme/api"},
    )  # fmt: skip
    forged = record(labels={"repository": "victim/repo", "change": "99", "project": "x"})
    for reporter in (SIDECAR, GATEWAY):
        checked = check_record(1, forged, check(reporter, pod=tagged))
        assert checked.refusal is None
        assert checked.record is not None
        assert checked.record.labels == {"repository": "acme/api", "change": "7"}


def test_a_caller_without_a_pod_gets_no_tags():
    cfg = config()
    keyed = record(pod="", caller="key", labels={"repository": "acme/api", "change": "1"})
    checked = check_record(1, keyed, check(GATEWAY, pod=None, cfg=cfg))
    assert checked.refusal is None
    assert checked.record is not None
    assert checked.record.labels == {}


def test_pod_facts_keep_only_costwarden_annotations():
    facts = pod_facts({"metadata": {
        "namespace": "shared", "name": "p", "uid": "u",
        "annotations": {"costwarden.io/change": "5", "kubectl.kubernetes.io/last": "x" * 1000},
    }})  # fmt: skip
    assert facts.annotations == {"costwarden.io/change": "5"}


TIERED = PRICES.model_copy(
    update={
        "cache_write_1h_per_m_tok_usd": Decimal("0.30"),
        "service_tiers": {
            "priority": ResolvedTierPricing(
                input_per_m_tok_usd=Decimal("0.25"),
                output_per_m_tok_usd=Decimal("1.00"),
                cached_input_per_m_tok_usd=Decimal("0.125"),
                cache_write_per_m_tok_usd=Decimal("0.25"),
                cache_write_1h_per_m_tok_usd=Decimal("0.50"),
            )
        },
    }
)


def test_the_service_tier_and_1h_cache_writes_are_priced_as_the_gateway_priced_them():
    """The operator recomputes a priority call at the priority prices and 1-hour cache
    writes at their own price; the same tokens claimed at the standard prices (or the
    1-hour writes at the 5-minute price) are refused."""
    cfg = config(TIERED)
    tokens = TokenUsage(input=10, output=5, cached_input=2, cache_creation=4, cache_creation_1h=8)
    # standard: 10*0.15 + 5*0.60 + 2*0.075 + 4*0.15 + 8*0.30 = 7.65 per million
    standard = Decimal("0.00000765")
    # priority: 10*0.25 + 5*1.00 + 2*0.125 + 4*0.25 + 8*0.50 = 12.75 per million
    priority = Decimal("0.00001275")
    for tier, cost in (("", standard), ("default", standard), ("priority", priority)):
        checked = check_record(1, record(tokens=tokens, service_tier=tier, cost_usd=cost),
                               check(cfg=cfg))  # fmt: skip
        assert checked.refusal is None, tier
        assert checked.record is not None
        assert checked.record.cost_usd == cost
    cheap = record(tokens=tokens, service_tier="priority", cost_usd=standard)
    assert check_record(2, cheap, check(cfg=cfg)).refusal is Refusal.COST_MISMATCH
    five_minute = Decimal("0.00000525")  # the 1-hour writes at the 5-minute price
    assert check_record(3, record(tokens=tokens, cost_usd=five_minute),
                        check(cfg=cfg)).refusal is Refusal.COST_MISMATCH  # fmt: skip


def test_price_memory_remembers_a_change_of_tier_prices_alone():
    clock = [0.0]
    memory = PriceMemory(keep=600, clock=lambda: clock[0])
    memory.observe(config(TIERED))
    tier = TIERED.service_tiers["priority"]
    dearer = TIERED.model_copy(
        update={"service_tiers": {"priority": tier.model_copy(
            update={"output_per_m_tok_usd": Decimal("2.00")})}}
    )  # fmt: skip
    clock[0] = 1.0
    memory.observe(config(dearer).model_copy(update={"revision": "r2"}))
    alpha = config(dearer).team("shared/alpha")
    assert alpha is not None
    assert memory.prices(alpha, "mini") == [dearer, TIERED]
