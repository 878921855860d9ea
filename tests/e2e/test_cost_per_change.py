"""Cost per result beyond Jobs: agent pods tagged with a repository and a change call
through the gateway; GitHub (a replayed fixture of pull_request deliveries, signed) and CI
(`costwarden result` with a service-account token) report how the changes ended; the
TeamBudget's status and the operator's metrics give the exact cost per merged change per
repository and the spend on changes that never merged."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from costwarden.accounting.forge import github_signature
from costwarden.api.results import RESULTS_AUDIENCE
from costwarden.api.usage import GATEWAY_AUDIENCE
from costwarden.ports import free_port
from tests.support.polling import wait_for
from tests.support.stack import Stack, running_stack

FIXTURES = Path(__file__).parents[1] / "fixtures" / "github"
WEBHOOK_SECRET = "fixture-webhook-secret"

# gpt-4o-mini at the catalog's prices, USD per million tokens (api/prices.yaml).
INPUT, CACHED, OUTPUT = Decimal("0.15"), Decimal("0.075"), Decimal("0.60")
REPLY_TOKENS = 5  # every call asks for max_tokens=5; the fake upstream's reply is longer


def call_usd(words: int) -> Decimal:
    """One call of ``words`` words, by hand: the fake upstream counts 3 + (4 + words)
    prompt tokens, half of them (rounded down) read from the cache, and 5 output tokens."""
    prompt = 3 + 4 + words
    cached = prompt // 2
    return ((prompt - cached) * INPUT + cached * CACHED + REPLY_TOKENS * OUTPUT) / 1_000_000


# (pod, repository annotation, change label, calls, words per call)
AGENTS = [
    ("agent-api-101", "acme/api", "101", 3, 3),
    ("agent-api-102", "acme/api", "102", 2, 3),
    ("agent-api-103", "acme/api", "103", 2, 11),
    ("agent-web-7", "Acme/Web", "7", 1, 3),
]


@pytest.fixture
def stack(control_plane, api_client, crds, kubeconfig, tmp_path):
    secret = tmp_path / "github-webhook-secret"
    secret.write_text(WEBHOOK_SECRET + "\n")
    metrics_port = free_port()
    with running_stack(
        control_plane, api_client, tmp_path,
        "--github-webhook-secret-file", str(secret),
        "--results-log", str(tmp_path / "results.jsonl"),
        "--store-dir", str(tmp_path / "store"),
        "--metrics-port", str(metrics_port),
        gateway_args=("--kubeconfig", kubeconfig),
    ) as running:  # fmt: skip
        running.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield running


def _pod(name: str, repository: str, change: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"team": "budget", "costwarden.io/change": change},
            # owner/name holds a '/', which a label value cannot: an annotation can.
            "annotations": {"costwarden.io/repository": repository},
        },
        "spec": {"serviceAccountName": "agent", "automountServiceAccountToken": False,
                 "containers": [{"name": "agent", "image": "busybox"}]},
    }  # fmt: skip


def _token(plane: Any, namespace: str, account: str, audience: str, pod: str = "") -> str:
    bound = ("--bound-object-kind", "Pod", "--bound-object-name", pod) if pod else ()
    return plane.kubectl(
        "create", "token", account, "-n", namespace, "--audience", audience, *bound
    ).stdout.strip()


def _deliver(
    stack: Stack, delivery: dict[str, Any], secret: str = WEBHOOK_SECRET
) -> httpx.Response:
    body = json.dumps(delivery["payload"]).encode()
    headers = {
        **delivery["headers"],
        "X-Hub-Signature-256": github_signature(secret.encode(), body),
    }
    with stack.ingest_client() as http:
        return http.post(stack.ingest_url.replace("/v1/usage", "/v1/results/github"),
                         content=body, headers=headers)  # fmt: skip


def _result_cli(stack: Stack, token_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "costwarden", "result",
         "--server", stack.ingest_url.removesuffix("/v1/usage"),
         "--ca-file", str(stack.ingest_ca), "--token-file", str(token_file), "--attempts", "1",
         *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cost_per_merged_change_per_repository_from_tagged_pods_and_reported_outcomes(
    stack: Stack, control_plane, api_client: client.ApiClient, namespace: str, tmp_path: Path
):
    core = client.CoreV1Api(api_client)
    for account in ("agent", "ci", "intruder"):
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
        )
    stack.team(namespace, "budget", "10", attribution={"resultReporters": [{"name": "ci"}]})
    for pod, repository, change, _, _ in AGENTS:
        core.create_namespaced_pod(namespace, _pod(pod, repository, change))

    expected: dict[str, Decimal] = {}
    for pod, _, change, calls, words in AGENTS:
        token = _token(control_plane, namespace, "agent", GATEWAY_AUDIENCE, pod)
        # The gateway re-reads its configuration about once a second: wait until it
        # serves the new team to this pod.
        wait_for(lambda t=token: stack.gateway._knows(t), timeout=30, what="gateway serving")
        sdk = openai.OpenAI(
            base_url=stack.gateway.url + "/v1", api_key=token, max_retries=0, timeout=10,
            default_headers={"X-Costwarden-Task": "code-review"},
        )  # fmt: skip
        for n in range(calls):
            text = " ".join(["w"] * (words - 1) + [f"{pod}-{n}"])
            sdk.chat.completions.create(
                model="gpt-4o-mini", max_tokens=REPLY_TOKENS,
                messages=[{"role": "user", "content": text}],
            )  # fmt: skip
        expected[change] = calls * call_usd(words)
    assert expected == {
        "101": Decimal("0.000012375"),  # 3 x (5*0.15 + 5*0.075 + 5*0.60) / 1e6
        "102": Decimal("0.00000825"),
        "103": Decimal("0.00001005"),  # 2 x (9*0.15 + 9*0.075 + 5*0.60) / 1e6
        "7": Decimal("0.000004125"),
    }

    def changes() -> dict[str, Any] | None:
        found = stack.status(namespace, "budget").get("changes") or {}
        listed = {c["change"]: c for c in found.get("changes") or []}
        return found if sum(c["requests"] for c in listed.values()) == 8 else None

    found = wait_for(changes, timeout=60, what="the tagged spend of the four changes")
    spent = {(c["repository"], c["change"]): Decimal(c["spentUSD"]) for c in found["changes"]}
    assert spent == {
        ("acme/api", "101"): expected["101"],
        ("acme/api", "102"): expected["102"],
        ("acme/api", "103"): expected["103"],
        ("acme/web", "7"): expected["7"],  # the annotation's Acme/Web, as the forge names it
    }

    # GitHub: a replayed fixture (ping, opened, two closed in acme/api, one in Acme/Web).
    deliveries = json.loads((FIXTURES / "pull_request_deliveries.json").read_text())
    forged = _deliver(stack, deliveries[2], secret="not-the-secret")
    assert forged.status_code == 401, forged.text
    answers = [_deliver(stack, d) for d in deliveries]
    assert [a.status_code for a in answers] == [202, 202, 200, 200, 200], [a.text for a in answers]
    assert [a.json()["applied"][0]["teams"] for a in answers[2:]] == [[f"{namespace}/budget"]] * 3

    # CI: `costwarden result` with a token of a service account the TeamBudget lists.
    ci = tmp_path / "ci-token"
    ci.write_text(_token(control_plane, namespace, "ci", RESULTS_AUDIENCE))
    done = _result_cli(stack, ci, "--repository", "acme/api", "--change", "#103",
                       "--outcome", "merged")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["teams"] == [f"{namespace}/budget"]
    # A service account no TeamBudget lists may not report (and changes nothing).
    intruder = tmp_path / "intruder-token"
    intruder.write_text(_token(control_plane, namespace, "intruder", RESULTS_AUDIENCE))
    refused = _result_cli(stack, intruder, "--repository", "acme/api", "--change", "103",
                          "--outcome", "closed")  # fmt: skip
    assert refused.returncode == 1
    assert "not_a_result_reporter" in refused.stderr

    def outcomes() -> dict[str, Any] | None:
        found = stack.status(namespace, "budget").get("changes") or {}
        repos = {r["repository"]: r for r in found.get("byRepository") or []}
        api = repos.get("acme/api", {})
        return repos if api.get("merged", {}).get("changes") == 2 and "acme/web" in repos else None

    repos = wait_for(outcomes, timeout=30, what="four outcomes joined to the spend")
    api, web = repos["acme/api"], repos["acme/web"]
    merged_api = expected["101"] + expected["103"]
    assert Decimal(api["merged"]["spentUSD"]) == merged_api
    assert Decimal(api["costPerMergedChangeUSD"]) == merged_api / 2 == Decimal("0.0000112125")
    assert (api["closed"]["changes"], Decimal(api["closed"]["spentUSD"])) == (1, expected["102"])
    assert Decimal(api["openUSD"]) == 0
    assert (web["merged"]["changes"], Decimal(web["costPerMergedChangeUSD"])) == (
        1, Decimal("0.000004125"),
    )  # fmt: skip
    status = stack.status(namespace, "budget")["changes"]
    assert Decimal(status["neverMergedUSD"]) == expected["102"]
    total_merged = merged_api + expected["7"]
    assert Decimal(status["costPerMergedChangeUSD"]) == total_merged / 3

    # A redelivery changes nothing (GitHub redelivers on a timeout).
    again = _deliver(stack, deliveries[2])
    assert again.status_code == 200
    assert again.json()["applied"][0]["teams"] == []
    assert stack.status(namespace, "budget")["changes"] == status

    # The same numbers as metrics, by team and repository.
    scrape = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).text  # type: ignore[attr-defined]
    team = f'team="{namespace}/budget"'
    assert (f'costwarden_budget_cost_per_merged_change_usd{{repository="acme/api",{team}}} '
            f"{float(Decimal('0.0000112125'))}") in scrape  # fmt: skip
    assert f"costwarden_budget_never_merged_usd{{{team}}} {float(expected['102'])}" in scrape

    # Every outcome is also logged for the usage store, in ChangeOutcome's columns.
    logged = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(o["repository"], o["change"], o["outcome"], o["source"]) for o in logged} >= {
        ("acme/api", "101", "merged", "github-webhook"),
        ("acme/api", "102", "closed", "github-webhook"),
        ("acme/web", "7", "merged", "github-webhook"),
        ("acme/api", "103", "merged", f"sa:{namespace}/ci"),
    }
    # The usage store answers the same question over any period: `costwarden report
    # changes` joins the stored usage to the stored outcomes, exactly.
    answer = subprocess.run(
        [sys.executable, "-m", "costwarden", "report", "changes", "--store",
         str(tmp_path / "store"), "-o", "json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    by_repository = {row["repository"]: row for row in json.loads(answer.stdout)}
    assert Decimal(str(by_repository["acme/api"]["cost_per_merged_change_usd"])) == Decimal(
        "0.0000112125"
    )
    assert Decimal(str(by_repository["acme/web"]["cost_per_merged_change_usd"])) == Decimal(
        "0.000004125"
    )
    assert Decimal(str(by_repository["acme/api"]["unmerged_cost_usd"])) == expected["102"]
    # The gateway recorded the declared task and the routing reason of each call.
    records = [json.loads(line) for line in stack.gateway.ledger.read_text().splitlines()]
    calls = [r for r in records if r.get("kind") == "UsageRecord" and r.get("pod")]
    assert len(calls) == 8
    assert {(r["task"], r["sensitivity"]) for r in calls} == {("code-review", "Internal")}
    assert all(r["routeReason"] for r in calls)
    # The gateway's own ledger carries the fixed tags among the pod's labels (the operator
    # recomputes them, annotations included, at ingestion).
    assert {r["pod"]: r["labels"] for r in calls} == {
        pod: {"change": change} for pod, _, change, _, _ in AGENTS
    }
