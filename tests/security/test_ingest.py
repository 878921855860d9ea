"""Hostile tenants against usage ingestion (issue 10, item 1; DESIGN.md T3).

A pod in namespace ``attacker`` projects a token for the audience ``costwarden.io/ingest``
(as an injected sidecar does) and posts forged usage to the operator, which runs with
``--ingest-allow-sidecars``. The victim's usage arrives from a trusted shared gateway (the
shared ingest token). Every attack is refused (403 with a reason, counted in
``costwarden_ingest_refused_total{reason}``) or, where the forged entry is the attacker's own
business (its own cursor, its own replay), leaves the victim's spend, cursors and Jobs as
they were. Everything runs on the real API server: TokenReview, pods created by the Job
controller, ownerReferences, status patches.
"""

from __future__ import annotations

import re
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from costwarden.api.usage import SIDECAR_REPORT_AUDIENCE
from costwarden.cluster import LocalControlPlane
from costwarden.testing.processes import free_port
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

GROUP, VERSION = "costwarden.io", "v1alpha1"
MODEL = "mini"
INPUT_PER_M, OUTPUT_PER_M = Decimal("1.00"), Decimal("2.00")
VICTIM_SOURCE = "gw-victim/0001"
SHARED_TOKEN = "shared-gateway-token-" + secrets.token_hex(8)


def cost_of(input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * INPUT_PER_M + output_tokens * OUTPUT_PER_M) / 1_000_000


@dataclass
class Tenant:
    namespace: str
    pod: str
    job: str = "agent"

    @property
    def team(self) -> str:
        return f"{self.namespace}/budget"


@dataclass
class World:
    url: str
    metrics_url: str
    api: client.ApiClient
    victim: Tenant
    attacker: Tenant
    attacker_token: str
    tls: ssl.SSLContext
    """Verifies the operator's ingestion certificate (ingestion is served over HTTPS only)."""
    victim_seq: int = 0

    # -- sending -------------------------------------------------------------------------

    def post(self, token: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            self.url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30,
            verify=self.tls,
        )  # fmt: skip

    def attack(self, *items: dict[str, Any], source: str = "attacker/1") -> httpx.Response:
        return self.post(self.attacker_token, {"source": source, "items": list(items)})

    def victim_reports(self, input_tokens: int = 1000, output_tokens: int = 500) -> None:
        """The victim's shared gateway reports one honest call, which must count."""
        self.victim_seq += 1
        item = {"seq": self.victim_seq, "record": record(self.victim, input_tokens, output_tokens,
                                                         caller="token")}  # fmt: skip
        answer = self.post(SHARED_TOKEN, {"source": VICTIM_SOURCE, "items": [item]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["ackedSeq"] == self.victim_seq

    # -- observing -----------------------------------------------------------------------

    def status(self, tenant: Tenant) -> dict[str, Any]:
        budget = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, tenant.namespace, "teambudgets", "budget"
        )
        return dict(budget.get("status") or {})

    def job(self, tenant: Tenant) -> Any:
        return client.BatchV1Api(self.api).read_namespaced_job(tenant.job, tenant.namespace)

    def snapshot(self, tenant: Tenant) -> dict[str, Any]:
        """What an attack must leave alone: spend, tokens, breakdowns, cursors, the Job."""
        status = self.status(tenant)
        job = self.job(tenant)
        return {
            "spentExactUSD": status.get("spentExactUSD"),
            "tokens": status.get("tokens"),
            "byModel": status.get("byModel"),
            "byJob": status.get("byJob"),
            "cursors": (status.get("ingestion") or {}).get("cursors"),
            "records": (status.get("ingestion") or {}).get("records"),
            "recentActions": status.get("recentActions"),
            "job": (job.metadata.uid, job.spec.suspend, job.metadata.deletion_timestamp),
        }

    def refused(self, reason: str) -> float:
        text = httpx.get(self.metrics_url, timeout=10).text
        match = re.search(
            rf'^costwarden_ingest_refused_total{{reason="{reason}"}} (\S+)$', text, re.M
        )
        return float(match.group(1)) if match else 0.0

    def assert_refused(self, answer: httpx.Response, reason: str, before: float) -> None:
        assert answer.status_code == 403, answer.text
        body = answer.json()
        assert body["error"]["code"] == reason, body
        assert body["rejected"][0]["reason"] == reason
        assert self.refused(reason) == before + 1


def record(
    tenant: Tenant,
    input_tokens: int = 1000,
    output_tokens: int = 500,
    *,
    caller: str = "sidecar",
    **overrides: Any,
) -> dict[str, Any]:
    """An honest usage record of ``tenant``'s pod: what its sidecar would send."""
    body = {
        "time": datetime.now(UTC).isoformat(), "team": tenant.team,
        "namespace": tenant.namespace, "pod": tenant.pod, "job": tenant.job, "caller": caller,
        "endpoint": "chat.completions", "requestedModel": MODEL, "servedModel": MODEL,
        "tokens": {"input": input_tokens, "output": output_tokens}, "usageReported": True,
        "costUSD": str(cost_of(input_tokens, output_tokens)), "outcome": "OK",
    }  # fmt: skip
    body.update(overrides)
    return body


def loop_signal(tenant: Tenant, **overrides: Any) -> dict[str, Any]:
    body = {
        "time": datetime.now(UTC).isoformat(), "team": tenant.team,
        "namespace": tenant.namespace, "pod": tenant.pod, "job": tenant.job,
        "loop": "IdenticalRequests", "count": 5, "windowSeconds": 300, "action": "Suspend",
    }  # fmt: skip
    body.update(overrides)
    return body


def _tenant(api: client.ApiClient, namespace: str) -> Tenant:
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "routingpolicies", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RoutingPolicy",
        "metadata": {"name": "routing"},
        "spec": {"models": [{
            "name": MODEL, "provider": "OpenAI", "endpoint": "https://api.openai.com/v1",
            "upstreamModel": "gpt-4o-mini",
            "pricing": {"inputPerMTokUSD": str(INPUT_PER_M), "outputPerMTokUSD": str(OUTPUT_PER_M)},
        }], "defaultModel": MODEL},
    })  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TeamBudget", "metadata": {"name": "budget"},
        "spec": {"hardCapUSD": "100", "routingPolicyRef": {"name": "routing"},
                 "loopDetection": {"action": "Suspend"}, "onHardCap": {"jobs": "Suspend"}},
    })  # fmt: skip
    # A real agent Job: the Job controller creates its pod (Pending: there is no kubelet),
    # owned by the Job through ownerReferences.
    client.BatchV1Api(api).create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "agent"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "serviceAccountName": "agent", "restartPolicy": "Never",
            "containers": [{"name": "agent", "image": "busybox:1.36"}],
        }}},
    })  # fmt: skip

    def pod() -> str:
        pods = core.list_namespaced_pod(
            namespace, label_selector="batch.kubernetes.io/job-name=agent"
        )
        return pods.items[0].metadata.name if pods.items else ""

    return Tenant(namespace, wait_for(pod, timeout=60, what=f"the Job's pod in {namespace}"))


@pytest.fixture(scope="module")
def world(
    control_plane: LocalControlPlane, api_client: client.ApiClient, crds, tmp_path_factory
) -> Iterator[World]:
    work: Path = tmp_path_factory.mktemp("ingest")
    suffix = secrets.token_hex(3)
    home = f"sec-ingest-home-{suffix}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    (work / "token").write_text(SHARED_TOKEN + "\n")
    port, metrics_port = free_port(), free_port()
    operator = OperatorProcess(
        str(control_plane.kubeconfig_path), home, work / "operator.log",
        "--standalone", "--ingest-port", str(port), "--ingest-listen-address", "127.0.0.1",
        "--ingest-allow-sidecars", "--ingest-token-file", str(work / "token"),
        "--metrics-port", str(metrics_port), "--ingest-cert-dir", str(work / "ingest-tls"),
    ).start()  # fmt: skip
    victim = _tenant(api_client, f"sec-victim-{suffix}")
    attacker = _tenant(api_client, f"sec-attacker-{suffix}")
    token = control_plane.kubectl(
        "create", "token", "agent", "-n", attacker.namespace, "--audience",
        SIDECAR_REPORT_AUDIENCE, "--bound-object-kind", "Pod", "--bound-object-name", attacker.pod,
    ).stdout.strip()  # fmt: skip
    ca = work / "ingest-tls" / "ca.crt"
    wait_for(ca.exists, timeout=60, what="the ingestion certificate")
    tls = ssl.create_default_context(cafile=str(ca))
    operator.wait_http_ok(f"https://127.0.0.1:{port}/healthz", timeout=60, context=tls)
    running = World(
        f"https://127.0.0.1:{port}/v1/usage", f"http://127.0.0.1:{metrics_port}/metrics",
        api_client, victim, attacker, token, tls,
    )  # fmt: skip

    def victim_counts() -> bool:
        item = {"seq": 1, "record": record(victim, caller="token")}
        answer = running.post(SHARED_TOKEN, {"source": VICTIM_SOURCE, "items": [item]})
        return answer.status_code == 200

    wait_for(victim_counts, timeout=90, what="the operator accepting the victim's usage")
    running.victim_seq = 1
    wait_for(
        lambda: running.status(victim).get("spentExactUSD") == "0.002",
        timeout=30, what="the victim's first call counted",
    )  # fmt: skip
    yield running
    operator.stop()
    for namespace in (home, victim.namespace, attacker.namespace):
        core.delete_namespace(namespace)


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    """The victim's spend, cursors and Job are the same after the test as before it."""
    before = world.snapshot(world.victim)
    yield
    assert world.snapshot(world.victim) == before


def test_charging_another_team_is_refused(world: World, unchanged: None):
    before = world.refused("team_mismatch")
    forged = record(world.attacker, team=world.victim.team)  # even at an honest price
    answer = world.attack({"seq": 1, "record": forged})
    world.assert_refused(answer, "team_mismatch", before)
    assert f"belongs to {world.attacker.team}, not to {world.victim.team}" in answer.text


def test_an_entry_for_another_namespaces_pod_is_refused(world: World, unchanged: None):
    before = world.refused("foreign_pod")
    answer = world.attack({"seq": 1, "record": record(world.victim)})
    world.assert_refused(answer, "foreign_pod", before)


def test_an_inflated_cost_for_the_own_team_is_refused(world: World, unchanged: None):
    own = world.snapshot(world.attacker)
    before = world.refused("cost_mismatch")
    # The issue's probe: $0.01 claimed for tokens worth $0.000002.
    answer = world.attack({"seq": 1, "record": record(world.attacker, 2, 0, costUSD="0.01")})
    world.assert_refused(answer, "cost_mismatch", before)
    assert "cost 0.000002 USD at the policy's prices" in answer.text
    assert world.snapshot(world.attacker) == own


def test_an_understated_cost_is_refused(world: World, unchanged: None):
    own = world.snapshot(world.attacker)
    before = world.refused("cost_mismatch")
    answer = world.attack({"seq": 1, "record": record(world.attacker, 900_000, 900_000,
                                                      costUSD="0.000001")})  # fmt: skip
    world.assert_refused(answer, "cost_mismatch", before)
    assert world.snapshot(world.attacker) == own


def test_a_served_model_outside_the_teams_policy_is_refused(world: World, unchanged: None):
    before = world.refused("model_not_in_policy")
    forged = record(world.attacker, servedModel="claude-opus-4", costUSD="0")
    answer = world.attack({"seq": 1, "record": forged})
    world.assert_refused(answer, "model_not_in_policy", before)


def test_huge_and_negative_token_counts_are_refused(world: World, unchanged: None):
    own = world.snapshot(world.attacker)
    before = world.refused("tokens_out_of_bounds")
    huge = record(world.attacker, 60_000_000, 0)
    answer = world.attack({"seq": 1, "record": huge})
    world.assert_refused(answer, "tokens_out_of_bounds", before)
    invalid = world.refused("invalid_batch")
    negative = record(world.attacker, -1_000_000, 0, costUSD="0")
    answer = world.attack({"seq": 1, "record": negative})
    assert answer.status_code == 400  # the schema refuses it before any check
    assert answer.json()["error"]["code"] == "invalid_batch"
    assert world.refused("invalid_batch") == invalid + 1
    assert world.snapshot(world.attacker) == own


@pytest.mark.parametrize("shift", [timedelta(days=1), -timedelta(hours=2), -timedelta(days=40)])
def test_a_time_far_in_the_future_or_past_is_refused(
    world: World, unchanged: None, shift: timedelta
):
    own = world.snapshot(world.attacker)
    before = world.refused("time_out_of_window")
    moved = record(world.attacker, time=(datetime.now(UTC) + shift).isoformat())
    answer = world.attack({"seq": 1, "record": moved})
    world.assert_refused(answer, "time_out_of_window", before)
    assert world.snapshot(world.attacker) == own


def test_a_loop_signal_naming_another_pods_job_is_refused(world: World, unchanged: None):
    before = world.refused("job_mismatch")
    # The victim's Job, named from the attacker's own pod (same name in another namespace
    # would be foreign_pod; another Job than the pod's owner is job_mismatch).
    answer = world.attack({"seq": 1, "loopSignal": loop_signal(world.attacker, job="victim")})
    world.assert_refused(answer, "job_mismatch", before)
    before = world.refused("foreign_pod")
    answer = world.attack({"seq": 1, "loopSignal": loop_signal(world.victim)})
    world.assert_refused(answer, "foreign_pod", before)
    assert not world.job(world.victim).spec.suspend


def test_advancing_another_sources_cursor_does_not_hide_its_usage(world: World):
    victim_before = world.status(world.victim)
    spent = Decimal(victim_before["spentExactUSD"])
    cursors = victim_before["ingestion"]["cursors"]
    # Toward the victim's team: refused outright.
    before = world.refused("team_mismatch")
    forged = record(world.attacker, team=world.victim.team)
    answer = world.attack({"seq": 2**62, "record": forged}, source=VICTIM_SOURCE)
    world.assert_refused(answer, "team_mismatch", before)
    # Under the victim gateway's source id, for its own team: it only advances its own cursor.
    answer = world.attack({"seq": 2**62, "record": record(world.attacker, 1, 0)},
                          source=VICTIM_SOURCE)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert world.status(world.victim)["ingestion"]["cursors"] == cursors
    attacker_cursors = world.status(world.attacker)["ingestion"]["cursors"]
    assert any(
        c["source"].startswith(f"pod:{world.attacker.namespace}/{world.attacker.pod}/")
        and c["source"].endswith(f"#{VICTIM_SOURCE}")
        and c["seq"] == 2**62
        for c in attacker_cursors
    ), attacker_cursors
    # The victim gateway's next real call still counts.
    world.victim_reports(1000, 500)
    status = world.status(world.victim)
    assert Decimal(status["spentExactUSD"]) == spent + cost_of(1000, 500)
    assert {c["source"]: c["seq"] for c in status["ingestion"]["cursors"]} == {
        f"token:shared#{VICTIM_SOURCE}": world.victim_seq
    }


def test_a_replayed_seq_is_counted_once(world: World, unchanged: None):
    first = record(world.attacker, 10, 10)
    answer = world.attack({"seq": 1, "record": first}, source="replay/1")
    assert answer.status_code == 200, answer.text
    spent = world.status(world.attacker)["spentExactUSD"]
    again = world.attack({"seq": 1, "record": first}, source="replay/1")
    assert again.status_code == 200
    assert again.json()["duplicates"] == 1
    bigger = world.attack({"seq": 1, "record": record(world.attacker, 5000, 5000)},
                          source="replay/1")  # fmt: skip
    assert bigger.json()["duplicates"] == 1
    assert world.status(world.attacker)["spentExactUSD"] == spent


def test_a_loop_signal_gets_the_budgets_action_never_its_own(world: World, unchanged: None):
    before = world.refused("action_mismatch")
    answer = world.attack({"seq": 1, "loopSignal": loop_signal(world.attacker, action="Delete")},
                          source="loops/1")  # fmt: skip
    world.assert_refused(answer, "action_mismatch", before)
    assert "sets loopDetection.action Suspend" in answer.text
    job = world.job(world.attacker)
    assert job.metadata.deletion_timestamp is None
    assert not job.spec.suspend
    # The honest signal for the pod's own Job is applied, with the budget's action.
    answer = world.attack({"seq": 2, "loopSignal": loop_signal(world.attacker)}, source="loops/1")
    assert answer.status_code == 200, answer.text
    suspended = wait_for(
        lambda: (j := world.job(world.attacker)).spec.suspend and j,
        timeout=30, what="the attacker's own looping Job suspended",
    )  # fmt: skip
    assert suspended.metadata.annotations["costwarden.io/stopped-reason"] == "RetryLoopDetected"
