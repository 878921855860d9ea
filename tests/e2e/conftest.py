"""End-to-end fixtures: the integration fixtures (a real control plane per session) plus
the whole stack per test (fake upstream, operator process, gateway process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures shared with integration)
    api_client,
    control_plane,
    crds,
    kubeconfig,
    namespace,
)
from tests.support.stack import Stack, running_stack

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def stack(control_plane, api_client, crds, tmp_path) -> Iterator[Stack]:  # noqa: F811
    with running_stack(control_plane, api_client, tmp_path) as running:
        yield running
        if running.operator.process and running.operator.process.returncode not in (None, 0, -15):
            print(running.operator.logs())
