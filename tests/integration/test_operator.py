"""The operator against a real API server: conditions, the gateway ConfigMap, Events."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from kubernetes import client

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME, GatewayConfig
from tests.integration.conftest import OPERATOR_NAMESPACE
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

GROUP, VERSION = "costwarden.io", "v1alpha1"


def _policy(name: str, default: str = "gpt-4.1-mini") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {
            "models": [
                {
                    "name": "gpt-4.1-mini",
                    "provider": "OpenAI",
                    "endpoint": "https://api.openai.com/v1",
                },
                {"name": "gpt-4.1", "provider": "OpenAI", "endpoint": "https://api.openai.com/v1"},
            ],
            "defaultModel": default,
        },
    }


def _budget(name: str, policy: str | None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hardCapUSD": 100, **spec}
    if policy:
        body["routingPolicyRef"] = {"name": policy}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TeamBudget",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def _create(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> None:
    plural = "teambudgets" if body["kind"] == "TeamBudget" else "routingpolicies"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)


def _condition(custom, namespace: str, plural: str, name: str, ctype: str = "Ready") -> dict | None:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    for condition in (obj.get("status") or {}).get("conditions", []):
        if condition["type"] == ctype:
            return {**condition, "_generation": obj["metadata"]["generation"]}
    return None


def _gateway_config(api_client: client.ApiClient) -> GatewayConfig | None:
    try:
        cm = client.CoreV1Api(api_client).read_namespaced_config_map(
            CONFIG_MAP_NAME, OPERATOR_NAMESPACE
        )
    except client.ApiException:
        return None
    return GatewayConfig.model_validate(json.loads(cm.data[CONFIG_MAP_KEY]))


def test_valid_budget_becomes_ready_and_reaches_the_gateway_config(
    operator: OperatorProcess, api_client, custom, namespace
):
    _create(custom, namespace, _policy("routing"))
    _create(custom, namespace, _budget("team", "routing"))

    ready = wait_for(
        lambda: (
            (c := _condition(custom, namespace, "teambudgets", "team"))
            and c["status"] == "True"
            and c
        ),
        what="budget Ready=True",
    )
    assert ready["reason"] == "Reconciled"
    assert ready["observedGeneration"] == ready["_generation"]
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", "team")[
        "status"
    ]
    assert status["phase"] == "Active"
    assert status["spentUSD"] == "0.00"
    assert status["currentPeriod"]["start"] < status["currentPeriod"]["end"]

    config = wait_for(
        lambda: (c := _gateway_config(api_client)) and c.team(f"{namespace}/team") and c,
        what="team in gateway config",
    )
    team = config.team(f"{namespace}/team")
    assert team is not None
    assert team.routing_policy == f"{namespace}/routing"
    assert team.namespaces == [namespace]
    policy = config.policy(f"{namespace}/routing")
    assert policy is not None
    assert policy.model("gpt-4.1-mini").pricing.input_per_m_tok_usd == Decimal("0.40")  # catalogue
    policy_ready = wait_for(
        lambda: (
            (c := _condition(custom, namespace, "routingpolicies", "routing"))
            and c["status"] == "True"
            and c
        )
    )
    assert policy_ready["reason"] == "Reconciled"


def test_routing_policy_change_updates_the_gateway_config(
    operator: OperatorProcess, api_client, custom, namespace
):
    _create(custom, namespace, _policy("routing"))
    _create(custom, namespace, _budget("team", "routing"))
    policy_id = f"{namespace}/routing"
    before = wait_for(
        lambda: (
            (c := _gateway_config(api_client))
            and c.policy(policy_id)
            and c.team(f"{namespace}/team")
            and c
        )
    )
    assert before.policy(policy_id).default_model == "gpt-4.1-mini"

    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "routingpolicies",
        "routing",
        {"spec": {"defaultModel": "gpt-4.1"}},
    )
    after = wait_for(
        lambda: (
            (c := _gateway_config(api_client))
            and c.policy(policy_id).default_model == "gpt-4.1"
            and c
        ),
        what="new default model in the config",
    )
    assert after.revision != before.revision
    assert after.policy(policy_id).generation == 2


def test_missing_policy_is_reported_in_a_condition_and_recovers(
    operator: OperatorProcess, api_client, custom, namespace
):
    _create(custom, namespace, _budget("team", "later"))
    waiting = wait_for(
        lambda: (
            (c := _condition(custom, namespace, "teambudgets", "team"))
            and c["status"] == "False"
            and c
        )
    )
    assert waiting["reason"] == "RoutingPolicyNotFound"
    assert f"{namespace}/later" in waiting["message"]
    config = _gateway_config(api_client)
    assert config is None or config.team(f"{namespace}/team") is None  # never half-applied

    _create(custom, namespace, _policy("later"))
    wait_for(
        lambda: (
            (c := _condition(custom, namespace, "teambudgets", "team")) and c["status"] == "True"
        ),
        what="budget recovers once the policy exists",
    )

    # The Event is posted just after the status write the poll above saw: poll for it too.
    def reasons() -> set[str]:
        events = client.CoreV1Api(api_client).list_namespaced_event(
            namespace, field_selector="involvedObject.name=team"
        )
        return {e.reason for e in events.items}

    wait_for(
        lambda: {"RoutingPolicyNotFound", "Reconciled"} <= reasons(),
        timeout=10,
        what="an Event for each transition",
    )


def test_what_cel_cannot_check_is_reported_with_the_field(
    operator: OperatorProcess, custom, namespace
):
    _create(custom, namespace, _budget("tz", None, period={"timeZone": "Mars/Olympus"}))
    condition = wait_for(lambda: (c := _condition(custom, namespace, "teambudgets", "tz")) and c)
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidSpec"
    assert "spec.period.timeZone" in condition["message"]
    phase = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", "tz")[
        "status"
    ]["phase"]
    assert phase == "Invalid"


def test_spend_in_status_drives_phase_and_conditions(operator: OperatorProcess, custom, namespace):
    """The accounting writes spend; the reconciler derives phase and conditions from it."""
    _create(custom, namespace, _budget("spender", None, softLimit={"percent": 50}))
    status = wait_for(
        lambda: (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", "spender")
            .get("status", {})
            .get("currentPeriod")
            and custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "teambudgets", "spender"
            )["status"]
        )
    )
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "teambudgets", "spender",
        {"status": {"spentUSD": "60.00", "currentPeriod": status["currentPeriod"]}},
    )  # fmt: skip
    soft = wait_for(
        lambda: (
            (c := _condition(custom, namespace, "teambudgets", "spender", "SoftLimitReached"))
            and c["status"] == "True"
            and c
        )
    )
    assert soft["reason"] == "SoftLimitExceeded"
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", "spender")
    assert obj["status"]["phase"] == "SoftLimited"
    assert obj["status"]["usedPercent"] == 60
    assert obj["status"]["remainingUSD"] == "40.00"
