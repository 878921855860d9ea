"""Fault suite: the control plane and our own processes fail under load, on the real
control plane, with the operator in Kopf peering mode as the chart runs it; so do the
gateway's ledger volume (full) and the upstream (slow, resetting, answering garbage).
Each case asserts that nothing is lost or counted twice (spend equals the upstream's
billing).

Shares the integration fixtures (one real control plane per session) and the e2e stack.
The quick cases run in the default suite; ``faults_long`` ones (a 60 s outage, 2 minutes
of a misbehaving upstream) only with
``make faults`` (COSTWARDEN_LONG_FAULTS=1), the ``soak`` (100 restarts) only with
``make soak`` (COSTWARDEN_SOAK=1)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from costwarden.cluster import LocalControlPlane, ensure_control_plane_binaries
from costwarden.ports import free_port
from tests.integration.conftest import (  # noqa: F401  (fixtures shared with integration)
    api_client,
    control_plane,
    crds,
    kubeconfig,
    namespace,
)
from tests.support.polling import wait_for
from tests.support.stack import Stack, running_stack

_HERE = Path(__file__).parent
REPO = _HERE.parents[1]
_OPT_IN = {"faults_long": "COSTWARDEN_LONG_FAULTS", "soak": "COSTWARDEN_SOAK"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.integration)
        for marker, variable in _OPT_IN.items():
            if item.get_closest_marker(marker) and not os.environ.get(variable):
                item.add_marker(pytest.mark.skip(reason=f"opt-in: set {variable}=1 (Makefile)"))


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(_HERE in item.path.parents for item in session.items):
        ensure_control_plane_binaries()


@pytest.fixture
def peering(control_plane: LocalControlPlane, crds) -> str:  # noqa: F811
    """A ClusterKopfPeering of the test's own (the operator elects itself through it)."""
    control_plane.kubectl(
        "apply", "--server-side", "-f", str(REPO / "charts/costwarden/crds/kopf.dev_peerings.yaml")
    )
    wait_for(
        lambda: control_plane.kubectl(
            "get", "crd/clusterkopfpeerings.kopf.dev", "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False,
        ).stdout == "True",
        timeout=60, what="peering CRD established",
    )  # fmt: skip
    name = f"costwarden-faults-{secrets.token_hex(3)}"
    control_plane.kubectl(
        "apply", "-f", "-",
        input=json.dumps({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                          "metadata": {"name": name}}),
    )  # fmt: skip
    return name


@pytest.fixture
def ports() -> dict[str, int]:
    return {"health": free_port(), "metrics": free_port(), "gateway_metrics": free_port()}


@pytest.fixture
def stack(
    control_plane,  # noqa: F811
    api_client,  # noqa: F811
    crds,  # noqa: F811
    tmp_path: Path,
    peering: str,
    ports: dict[str, int],
) -> Iterator[Stack]:
    with running_stack(
        control_plane, api_client, tmp_path,
        "--health-port", str(ports["health"]), "--metrics-port", str(ports["metrics"]),
        peering=peering,
        gateway_args=("--metrics-port", str(ports["gateway_metrics"])),
    ) as running:  # fmt: skip
        yield running
        # A fault test must leave the control plane whole for the tests after it.
        control_plane.check_alive()
