"""The control plane fails under load: kube-apiserver stopped (10 s in the default suite,
60 s with ``make faults``), etcd restarted. The gateway keeps answering meanwhile, the
operator (Kopf peering, as the chart runs it) resumes by itself, a TeamBudget edit made
afterwards reaches the gateway ConfigMap, and spend equals the upstream's bill exactly."""

from __future__ import annotations

import time

import pytest

from costwarden.cluster import LocalControlPlane
from tests.faults.faults import (
    answered,
    books_match_the_bill,
    edit_reaches_the_gateway_config,
    failed,
    failing,
    healthz,
    restarts,
    scrape,
    start_load,
    summary,
)
from tests.support.polling import wait_for
from tests.support.stack import Stack


def _outage(
    stack: Stack, namespace: str, plane: LocalControlPlane, ports: dict[str, int],
    *, component: str, seconds: float,
) -> None:  # fmt: skip
    agents = start_load(stack, namespace)
    before = answered(agents)
    if component == "apiserver":
        plane.stop_apiserver(kill=True)
    else:
        plane.stop_etcd(kill=True)
    began = time.monotonic()
    # The outage lasts `seconds` on purpose; meanwhile calls must keep being answered.
    wait_for(
        lambda: time.monotonic() - began >= seconds,
        timeout=seconds + 5, interval=0.5, what=f"{seconds}s of {component} outage",
    )  # fmt: skip
    during = answered(agents) - before
    if component == "apiserver":
        plane.start_apiserver()
    else:
        plane.start_etcd()
    assert during > 0, "the gateway stopped answering while the control plane was down"
    assert stack.operator.alive, stack.operator.logs(tail=80)
    took = edit_reaches_the_gateway_config(stack, namespace, "333")
    for agent in agents:
        agent.finish()
    assert failed(agents) == 0, "a call failed: the gateway must not depend on the API server"
    spent = books_match_the_bill(stack, namespace)
    # Recovered: no task failing, liveness green, on both sides.
    wait_for(lambda: not failing(scrape(ports["metrics"])), timeout=60, interval=1,
             what="no operator task failing")  # fmt: skip
    assert healthz(ports["health"]) == 200
    assert healthz(ports["gateway_metrics"]) == 200
    print(summary(
        fault=f"{component} down {seconds}s", calls=len(stack.upstream.calls),
        answered_during_outage=during, edit_to_config_seconds=round(took, 1), spent=spent,
        operator_task_restarts=restarts(scrape(ports["metrics"])),
    ))  # fmt: skip


def test_apiserver_stopped_10s_under_load_loses_nothing(
    stack: Stack, namespace: str, control_plane: LocalControlPlane, ports: dict[str, int]
):
    _outage(stack, namespace, control_plane, ports, component="apiserver", seconds=10)


@pytest.mark.faults_long
def test_apiserver_stopped_60s_under_load_loses_nothing(
    stack: Stack, namespace: str, control_plane: LocalControlPlane, ports: dict[str, int]
):
    _outage(stack, namespace, control_plane, ports, component="apiserver", seconds=60)


def test_etcd_restarted_under_load_loses_nothing(
    stack: Stack, namespace: str, control_plane: LocalControlPlane, ports: dict[str, int]
):
    _outage(stack, namespace, control_plane, ports, component="etcd", seconds=5)
