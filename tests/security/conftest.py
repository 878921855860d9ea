"""Hostile-tenant suite: attacks a tenant (a pod, a namespace admin) could try, each run
against the real control plane and expected to be refused with the victim unchanged.

Shares the integration fixtures (one real control plane per session) and the e2e stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from costwarden.cluster import ensure_control_plane_binaries
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


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(_HERE in item.path.parents for item in session.items):
        ensure_control_plane_binaries()


@pytest.fixture
def stack(control_plane, api_client, crds, tmp_path) -> Iterator[Stack]:  # noqa: F811
    with running_stack(control_plane, api_client, tmp_path) as running:
        yield running
