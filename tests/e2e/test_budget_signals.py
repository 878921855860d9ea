"""What alerting reads, after a known spend: the soft-limit Event on the API server, and
the operator's /metrics values (spend, limits, ratio, phase per team) that the chart's
alert rules (charts/costwarden/alerts/costwarden-rules.yaml) compare."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import openai
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from costwarden.api.money import format_money
from costwarden.api.teambudget import BudgetPhase
from costwarden.ports import free_port
from tests.support.polling import wait_for
from tests.support.stack import GROUP, VERSION, Stack, floor6, running_stack, upstream_cost

HARD_CAP, SOFT_LIMIT = Decimal("0.001"), Decimal("0.0001")  # softLimit: 10 percent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metered(control_plane, api_client, crds, tmp_path) -> Iterator[tuple[Stack, int]]:
    port = free_port()
    with running_stack(control_plane, api_client, tmp_path, "--metrics-port", str(port)) as stack:
        yield stack, port


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


ALERTED = (
    "costwarden_budget_spent_usd",
    "costwarden_budget_limit_usd",
    "costwarden_budget_soft_limit_usd",
    "costwarden_budget_used_ratio",
    "costwarden_budget_phase",
)


def team_series(samples: Samples, team: str) -> dict[str, float]:
    """The series of ``team`` the alert rules read: name, or name{phase} for the phase."""
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name in ALERTED and label.get("team") == team:
            out[f"{name}{{{label['phase']}}}" if "phase" in label else name] = value
    return out


def micro(amount: Decimal) -> Decimal:
    """Spend as the gateway configuration and ``status.spentUSD`` carry it: whole
    micro-dollars, rounded down (so the series reach a cap exactly when the spend does)."""
    return Decimal(floor6(amount))


def metrics_at(port: int, team: str, spent: Decimal) -> dict[str, float]:
    """The team's series once the spend series shows ``micro(spent)`` (else the last scrape)."""
    last: dict[str, float] = {}

    def probe() -> dict[str, float] | None:
        nonlocal last
        last = team_series(scrape(port), team)
        return last if last.get("costwarden_budget_spent_usd") == float(micro(spent)) else None

    try:
        return wait_for(probe, timeout=20, what=f"the operator's metrics at {spent}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last scrape: {last}") from None


def expected_series(spent: Decimal, phase: BudgetPhase) -> dict[str, float]:
    return {
        "costwarden_budget_spent_usd": float(micro(spent)),
        "costwarden_budget_limit_usd": float(HARD_CAP),
        "costwarden_budget_soft_limit_usd": float(SOFT_LIMIT),
        "costwarden_budget_used_ratio": float(micro(spent) / HARD_CAP),
        **{
            f"costwarden_budget_phase{{{p.value}}}": 1.0 if p is phase else 0.0 for p in BudgetPhase
        },
    }


def call(agent: openai.OpenAI, n: int) -> None:
    agent.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"Plan step {n}."}]
    )


def soft_events(api_client: client.ApiClient, namespace: str) -> list[client.CoreV1Event]:
    events = client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector="involvedObject.name=budget"
    )
    return [e for e in events.items if e.reason == "SoftLimitExceeded"]


def test_soft_limit_event_and_metric_values_after_known_spend(
    metered: tuple[Stack, int], namespace: str, api_client: client.ApiClient
) -> None:
    stack, port = metered
    team = stack.team(namespace, "budget", str(HARD_CAP), softLimit={"percent": 10})
    agent = stack.gateway.agent(team, namespace, "agent-1")
    n = 0
    while upstream_cost(stack.upstream) < SOFT_LIMIT:  # stop at the call that crosses it
        call(agent, n)
        n += 1
        assert n < 500, "the soft limit was never crossed"
    spent = upstream_cost(stack.upstream)
    assert SOFT_LIMIT <= spent < HARD_CAP

    wait_for(
        lambda: stack.status(namespace, "budget").get("phase") == "SoftLimited", timeout=20,
        what="phase SoftLimited",
    )  # fmt: skip
    assert Decimal(stack.status(namespace, "budget")["spentExactUSD"]) == spent
    series = metrics_at(port, team, spent)
    assert series == expected_series(spent, BudgetPhase.SOFT_LIMITED)
    # CostwardenSoftLimitReached's expression holds, CostwardenHardCapReached's does not.
    assert series["costwarden_budget_soft_limit_usd"] <= series["costwarden_budget_spent_usd"]
    assert series["costwarden_budget_phase{SoftLimited}"] == 1.0
    assert series["costwarden_budget_phase{Exhausted}"] == 0.0

    budget = stack.budget(namespace, "budget")
    event = wait_for(lambda: soft_events(api_client, namespace), timeout=20, what="the Event")[0]
    assert event.type == "Warning"
    involved = event.involved_object
    assert (involved.api_version, involved.kind) == (f"{GROUP}/{VERSION}", "TeamBudget")
    assert (involved.namespace, involved.name) == (namespace, "budget")
    assert involved.uid == budget["metadata"]["uid"]
    assert event.message == (
        f"SoftLimitReached=True: spent {format_money(spent)} USD, past the "
        f"{format_money(SOFT_LIMIT)} USD soft limit"
    )

    # On to the hard cap: the phase series move, and the soft limit is not announced again.
    for step in range(n, n + 500):
        try:
            call(agent, step)
        except openai.RateLimitError:
            break
    else:
        raise AssertionError("calls kept flowing past the hard cap")
    wait_for(
        lambda: stack.status(namespace, "budget").get("phase") == "Exhausted", timeout=20,
        what="phase Exhausted",
    )  # fmt: skip
    final = upstream_cost(stack.upstream)
    assert final <= HARD_CAP  # reserved before forwarding: the cap is reached, never passed
    wait_for(
        lambda: Decimal(stack.status(namespace, "budget")["spentExactUSD"]) == final, timeout=20,
        what=f"status spend {final}",
    )  # fmt: skip
    series = metrics_at(port, team, final)
    assert series == expected_series(final, BudgetPhase.EXHAUSTED)
    assert series["costwarden_budget_phase{Exhausted}"] == 1.0  # CostwardenHardCapReached
    assert len(soft_events(api_client, namespace)) == 1
