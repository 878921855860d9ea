"""Hostile tenants against provider keys: a tenant tries to get the platform team's key
mirrored for its own policy, to name another namespace's Secret, or to read the mirror.

Runs on the real control plane with the chart's RBAC (the operator as its ServiceAccount,
``providerKeys.namespaces`` = the platform's namespace only; see
tests/integration/test_provider_keys.py for the fixture). Each attack is refused
(Ready=False, pruned/refused field, 403) and the victim's key and policy are unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.policy.provider_keys import mirrored_key
from tests.integration.test_provider_keys import (  # noqa: F401  (module fixture)
    GROUP,
    VERSION,
    Installed,
    installed,
    policy,
)
from tests.support.polling import wait_for

VICTIM_KEY = "sk-platform-victim-key"


@pytest.fixture(scope="module")
def victim(installed: Installed) -> str:  # noqa: F811
    """The platform team's policy and key in the listed namespace, mirrored."""
    i = installed
    i.put_secret(i.allowed, "victim-credentials", **{"api-key": VICTIM_KEY})
    i.apply(i.allowed, policy("victim", {"name": "victim-credentials", "key": "api-key"}))
    key = mirrored_key(CredentialRef(namespace=i.allowed, name="victim-credentials", key="api-key"))
    wait_for(lambda: i.mirror().get(key) == VICTIM_KEY, timeout=60, what="victim mirrored")
    return key


def _victim_unchanged(i: Installed, key: str) -> None:
    assert i.mirror().get(key) == VICTIM_KEY
    ready = i.ready(i.allowed, "victim")
    assert ready is not None
    assert ready["status"] == "True"
    leaked = [k for k, v in i.mirror().items() if v == VICTIM_KEY and k != key]
    assert leaked == [], "the victim's key was mirrored under another reference"


def _ready_false(i: Installed, namespace: str, name: str) -> dict[str, Any]:
    condition: dict[str, Any] = wait_for(
        lambda: (c := i.ready(namespace, name)) and c["status"] == "False" and c,
        timeout=60, what=f"Ready=False on {namespace}/{name}",
    )  # fmt: skip
    return condition


def test_a_tenant_policy_naming_the_platform_secret_gets_nothing(
    installed: Installed,  # noqa: F811
    victim: str,
) -> None:
    """Attack: in its own (unlisted) namespace, a tenant writes a RoutingPolicy whose model
    names the platform's Secret ``victim-credentials``, hoping the operator resolves it.
    Expected: the reference means the tenant's own namespace, which the operator may not
    read: Ready=False CredentialsNotReadable; nothing mirrored for the tenant."""
    i = installed
    i.apply(i.forbidden, policy("thief", {"name": "victim-credentials", "key": "api-key"}))
    condition = _ready_false(i, i.forbidden, "thief")
    assert condition["reason"] == "CredentialsNotReadable"
    assert f"Secret {i.forbidden}/victim-credentials" in condition["message"]
    assert not [k for k in i.mirror() if k.startswith(f"{i.forbidden}_")]
    _victim_unchanged(i, victim)


def test_a_credentials_namespace_field_is_refused_or_pruned(
    installed: Installed,  # noqa: F811
    victim: str,
) -> None:
    """Attack: the tenant adds ``namespace: <platform>`` to its credentials reference.
    Expected: strict field validation refuses it; without it the API server prunes the
    unknown field, so the reference still means the tenant's own namespace."""
    i = installed
    body = policy(
        "cross",
        {"name": "victim-credentials", "key": "api-key", "namespace": i.allowed},
    )
    with pytest.raises(ApiException) as refused:
        i.custom.create_namespaced_custom_object(
            GROUP, VERSION, i.forbidden, "routingpolicies", body, field_validation="Strict"
        )
    assert refused.value.status == 400
    assert "namespace" in str(refused.value.body)

    i.apply(i.forbidden, body)  # the default (Warn): stored without the unknown field
    stored = i.custom.get_namespaced_custom_object(
        GROUP, VERSION, i.forbidden, "routingpolicies", "cross"
    )
    assert stored["spec"]["models"][0]["credentials"] == {
        "name": "victim-credentials",
        "key": "api-key",
    }
    condition = _ready_false(i, i.forbidden, "cross")
    assert f"Secret {i.forbidden}/victim-credentials" in condition["message"]
    _victim_unchanged(i, victim)


def test_a_tenant_cannot_read_the_mirror_or_the_platform_secret(
    installed: Installed,  # noqa: F811
    victim: str,
) -> None:
    """Attack: a tenant's workload (its namespace's default ServiceAccount) reads the
    mirror or the platform's Secret through the API. Expected: 403 (can-i says no)."""
    i = installed
    tenant = f"system:serviceaccount:{i.forbidden}:default"
    for namespace, resource in (
        (i.namespace, f"secrets/{i.mirror_name}"),
        (i.allowed, "secrets/victim-credentials"),
    ):
        answer = i.plane.kubectl(
            "auth", "can-i", "get", resource, "--as", tenant, "--namespace", namespace,
            check=False,
        ).stdout.strip()  # fmt: skip
        assert answer == "no", f"a tenant can get {namespace}/{resource}"
    _victim_unchanged(i, victim)
