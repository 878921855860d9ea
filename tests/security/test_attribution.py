"""Hostile tenants against attribution tags and change outcomes (issue 14).

Two teams, each a namespace with its own TeamBudget, call through the shared gateway with
pod-bound service-account tokens. The attacker tags its own pod with the victim's
repository and change, and reports that change closed with a service account its own
TeamBudget lists; it also tries the outcome endpoints with credentials that are not
results credentials. Expected: the attacker's spend lands under that tag in the
attacker's books only; its report changes the attacker's books only; the others are
refused (401/403); the victim's status (spend, changes, tags) is unchanged.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from costwarden.accounting.forge import github_signature
from costwarden.api.results import RESULTS_AUDIENCE
from costwarden.api.usage import GATEWAY_AUDIENCE, INGEST_AUDIENCE
from tests.support.polling import wait_for
from tests.support.stack import Stack, running_stack

REPO, CHANGE = "victim/app", "1"


@pytest.fixture
def attacker_ns(api_client: client.ApiClient) -> Iterator[str]:
    name = f"cw-attacker-{secrets.token_hex(4)}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def stack(control_plane, api_client, crds, kubeconfig, tmp_path) -> Iterator[Stack]:
    secret = tmp_path / "webhook-secret"
    secret.write_text("the-real-webhook-secret\n")
    with running_stack(
        control_plane, api_client, tmp_path, "--github-webhook-secret-file", str(secret),
        gateway_args=("--kubeconfig", kubeconfig),
    ) as running:  # fmt: skip
        yield running


def _tenant(stack: Stack, api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    for account in ("agent", "ci"):
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
        )
    stack.team(namespace, "budget", "10", attribution={"resultReporters": [{"name": "ci"}]})
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent", "labels": {"team": "budget", "costwarden.io/change": CHANGE},
                     "annotations": {"costwarden.io/repository": REPO}},
        "spec": {"serviceAccountName": "agent", "automountServiceAccountToken": False,
                 "containers": [{"name": "agent", "image": "busybox"}]},
    })  # fmt: skip


def _token(plane: Any, namespace: str, account: str, audience: str, pod: str = "") -> str:
    bound = ("--bound-object-kind", "Pod", "--bound-object-name", pod) if pod else ()
    return plane.kubectl(
        "create", "token", account, "-n", namespace, "--audience", audience, *bound
    ).stdout.strip()


def _call(stack: Stack, token: str, calls: int) -> None:
    wait_for(lambda: stack.gateway._knows(token), timeout=30, what="gateway serving the team")
    sdk = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=token, max_retries=0,
                        timeout=10)  # fmt: skip
    for n in range(calls):
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"work {n}"}]
        )


def _changes(stack: Stack, namespace: str, requests: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = stack.status(namespace, "budget").get("changes") or {}
        listed = found.get("changes") or []
        return found if sum(c["requests"] for c in listed) == requests else None

    return wait_for(ready, timeout=60, what=f"{requests} tagged calls of {namespace}")


def _results(stack: Stack, token: str, body: dict[str, Any]) -> httpx.Response:
    with stack.ingest_client() as http:
        return http.post(stack.ingest_url.replace("/v1/usage", "/v1/results"), json=body,
                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip


def test_a_tenant_cannot_move_another_teams_change_spend_or_outcomes(
    stack: Stack, control_plane, api_client: client.ApiClient, namespace: str, attacker_ns: str
):
    victim = namespace
    _tenant(stack, api_client, victim)
    _tenant(stack, api_client, attacker_ns)
    _call(stack, _token(control_plane, victim, "agent", GATEWAY_AUDIENCE, "agent"), 2)
    _call(stack, _token(control_plane, attacker_ns, "agent", GATEWAY_AUDIENCE, "agent"), 3)
    before = _changes(stack, victim, 2)
    attacker = _changes(stack, attacker_ns, 3)
    # The attacker's spend under the victim's tag stays in the attacker's books.
    assert [(c["repository"], c["change"], c["requests"]) for c in before["changes"]] == [
        (REPO, CHANGE, 2)
    ]
    assert [(c["repository"], c["change"], c["requests"]) for c in attacker["changes"]] == [
        (REPO, CHANGE, 3)
    ]
    victim_spend = Decimal(before["changes"][0]["spentUSD"])
    assert victim_spend == Decimal(stack.status(victim, "budget")["spentExactUSD"])

    # 1. The attacker's own listed CI reports the victim's change closed: its own books only.
    own_ci = _token(control_plane, attacker_ns, "ci", RESULTS_AUDIENCE)
    answer = _results(stack, own_ci, {"repository": REPO, "change": CHANGE, "outcome": "closed"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["teams"] == [f"{attacker_ns}/budget"]
    # 2. Not a results credential: the attacker's gateway and ingest tokens, a pod token.
    for audience in (GATEWAY_AUDIENCE, INGEST_AUDIENCE):
        token = _token(control_plane, attacker_ns, "agent", audience, "agent")
        refused = _results(stack, token, {"repository": REPO, "change": CHANGE,
                                          "outcome": "closed"})  # fmt: skip
        assert refused.status_code == 401, refused.text
    # 3. A results token of a service account no TeamBudget lists.
    unlisted = _token(control_plane, attacker_ns, "agent", RESULTS_AUDIENCE)
    refused = _results(stack, unlisted, {"repository": REPO, "change": CHANGE, "outcome": "closed"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "not_a_result_reporter"
    # 4. A forged GitHub delivery (the attacker does not know the webhook secret).
    payload = {"action": "closed", "repository": {"full_name": REPO},
               "pull_request": {"number": 1, "merged": False,
                                "closed_at": "2026-11-29T12:00:00Z"}}  # fmt: skip
    body = json.dumps(payload).encode()
    with stack.ingest_client() as http:
        forged = http.post(
            stack.ingest_url.replace("/v1/usage", "/v1/results/github"), content=body,
            headers={"X-GitHub-Event": "pull_request",
                     "X-Hub-Signature-256": github_signature(b"guessed", body)},
        )  # fmt: skip
    assert forged.status_code == 401

    after = stack.status(victim, "budget")
    assert after["changes"] == before, "the victim's changes are unchanged"
    assert after["changes"]["changes"][0].get("outcome") is None
    assert Decimal(after["changes"]["byRepository"][0]["openUSD"]) == victim_spend
    closed = stack.status(attacker_ns, "budget")["changes"]["byRepository"][0]["closed"]
    assert closed["changes"] == 1, "the attacker's own report did apply to its own books"
