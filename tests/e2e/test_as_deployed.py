"""Issue #9's done-when: costwarden as a platform team installs it. On the real control
plane, in docs/install-helm.md's order: examples/' namespaces, `helm install` of the chart
(webhook on, `providerKeys.namespaces={ai-platform}`), the provider-key Secrets created by
the commands the docs show, examples/ applied (caps lowered to test size; the payments team
owns its policy and key, as the docs say a sidecar team does), then agent Jobs using the
official openai SDK.

Every pod (the operator, both shared-gateway replicas, the agent pods and their injected
sidecars) is run by the process kubelet from what the API server holds: the chart's
manifests, the webhook's mutation, the Job's template. Nothing here wires a pod by hand, so
a chart whose wiring is broken fails these tests. The examples' endpoints are unchanged:
pods resolve api.openai.com / api.anthropic.com to a fake provider serving HTTPS with a
private CA that the project image trusts (SSL_CERT_FILE), as an egress-controlled cluster
with its own CA would.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import shlex
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from costwarden.api.catalog import default_catalog
from costwarden.api.routingpolicy import ModelBackend, Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.cluster import LocalControlPlane
from costwarden.cluster.kubelet import ProcessKubelet, default_image_map
from costwarden.pki import PrivateCA
from costwarden.policy.pricing import call_cost, resolve_pricing
from costwarden.testing.threads import ServerThread
from costwarden.testing.upstream import FakeUpstream, ServedCall
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "costwarden"
RELEASE = "costwarden"
MODEL = "gpt-4.1-mini"
TEAM_NAMESPACES = ("ai-platform", "team-payments", "team-support")
GATEWAY_AUDIENCE = "costwarden.io/gateway"
TOKEN_DIR = "/var/run/secrets/costwarden.io"
# docs/agents.md's projected token for the shared gateway, as a team copies it.
GATEWAY_TOKEN_VOLUME = {
    "name": "gateway-token",
    "projected": {
        "sources": [
            {
                "serviceAccountToken": {
                    "audience": GATEWAY_AUDIENCE,
                    "expirationSeconds": 3600,
                    "path": "token",
                }
            }
        ]
    },
}
GATEWAY_TOKEN_MOUNT = {"name": "gateway-token", "mountPath": TOKEN_DIR, "readOnly": True}

pytestmark = pytest.mark.timeout(900)

# The agent a team would ship: the official openai SDK, configured by environment only
# (OPENAI_BASE_URL from the injector, or set in the Job for the shared gateway). It keeps
# asking until its pod is stopped; prompts differ so loop detection stays out of the way.
AGENT = """
import os, sys, time, openai
tag, token_file = sys.argv[1], os.environ.get("TOKEN_FILE")
for n in range(100000):
    key = open(token_file).read().strip() if token_file else "unused-with-a-sidecar"
    agent = openai.OpenAI(api_key=key, max_retries=0, timeout=10)
    try:
        answer = agent.chat.completions.create(
            model="gpt-4.1-mini", messages=[{"role": "user", "content": f"{tag} call {n}"}],
            max_tokens=32)
        print("ok", n, answer.usage.total_tokens, flush=True)
        if os.environ.get("ONE_CALL"):
            sys.exit(0)
    except openai.APIStatusError as error:
        print("refused", error.status_code, error.message, flush=True)
        if os.environ.get("ONE_CALL"):
            sys.exit(1)
        time.sleep(1)
    except openai.APIConnectionError as error:
        print("no connection", error, flush=True)
        time.sleep(0.5)
"""


@dataclass
class Deployed:
    plane: LocalControlPlane
    api: client.ApiClient
    kubelet: ProcessKubelet
    upstream: FakeUpstream
    namespace: str
    rendered: str

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def budget_status(self, namespace: str, name: str) -> dict[str, Any]:
        custom = client.CustomObjectsApi(self.api)
        budget = custom.get_namespaced_custom_object(
            "costwarden.io", "v1alpha1", namespace, "teambudgets", name
        )
        return dict(budget.get("status") or {})

    def job(self, namespace: str, name: str) -> client.V1Job | None:
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, namespace: str, job: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


# -- the installation ------------------------------------------------------------------------


KEYS = {
    "$OPENAI_API_KEY": f"sk-platform-openai-{secrets.token_hex(6)}",
    "$ANTHROPIC_API_KEY": f"sk-platform-anthropic-{secrets.token_hex(6)}",
    "$TEAM_PAYMENTS_OPENAI_KEY": f"sk-payments-openai-{secrets.token_hex(6)}",
}
PROVIDER_HOSTS = ("api.openai.com", "api.anthropic.com")
TEAM_POLICY = "payments-openai"


def documented_secret_commands() -> list[list[str]]:
    """Every `kubectl ... create secret generic` of docs/install-helm.md's shell blocks,
    the keys' environment variables filled in: the keys go exactly where the docs say."""
    text = (REPO / "docs" / "install-helm.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("kubectl") and "create secret generic" in line:
                for variable, key in KEYS.items():
                    line = line.replace(f'"{variable}"', key)
                commands.append(shlex.split(line.split("#")[0])[1:])
    assert commands, "docs/install-helm.md shows no `kubectl create secret generic`"
    return commands


def examples() -> list[dict[str, Any]]:
    """examples/ as a user applies them, the caps lowered to a few calls' worth (money caps
    may not exceed the team's, and a job's own cap would trip first)."""
    documents = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for document in documents:
        if document["kind"] == "TeamBudget":
            spec = document["spec"]
            spec["hardCapUSD"] = "0.0004"
            spec["softLimit"] = {"percent": 90}
            spec.get("perJob", {}).pop("maxCostUSD", None)
            for cap in spec.get("modelCaps", []):
                cap["maxCostUSD"] = "0.0004"
            if document["metadata"]["name"] == "payments":
                # docs/install-helm.md: a team using sidecars owns its policy and key.
                spec["routingPolicyRef"] = {"name": TEAM_POLICY, "namespace": "team-payments"}
    return documents


def team_policy() -> dict[str, Any]:
    """The payments team's own RoutingPolicy, with the key it holds in its namespace."""
    model = {
        "name": MODEL,
        "provider": "OpenAI",
        "endpoint": "https://api.openai.com/v1",
        "credentials": {"name": "openai-credentials", "key": "api-key"},
    }
    return {
        "apiVersion": "costwarden.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": TEAM_POLICY, "namespace": "team-payments"},
        "spec": {"models": [model], "defaultModel": MODEL},
    }


def fake_provider(kubelet: ProcessKubelet, workdir: Path) -> tuple[FakeUpstream, ServerThread]:
    """The fake provider on https://api.openai.com and api.anthropic.com as pods resolve
    them (the kubelet's stand-in for upstream DNS), its certificate from a private CA that
    the project image trusts (SSL_CERT_FILE, as an image built with a private CA would)."""
    authority = PrivateCA("costwarden-e2e-provider-ca", datetime.timedelta(days=1))
    serving = authority.issue_server(list(PROVIDER_HOSTS))
    for name, pem in (
        ("ca.pem", authority.cert_pem),
        ("tls.crt", serving.cert_pem),
        ("tls.key", serving.key_pem),
    ):
        (workdir / name).write_bytes(pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(workdir / "tls.crt", workdir / "tls.key")
    kubelet.images = default_image_map({"SSL_CERT_FILE": str(workdir / "ca.pem")})
    for host in PROVIDER_HOSTS:
        kubelet.extra_hosts[host] = kubelet.host_ip
    upstream = FakeUpstream()
    server = ServerThread(upstream.app, host=kubelet.host_ip, port=443, ssl_context=context)
    return upstream, server.__enter__()


@pytest.fixture(scope="module")
def deployed(
    request: pytest.FixtureRequest,
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    crds: list[str],
) -> Iterator[Deployed]:
    failures_before = request.session.testsfailed
    namespace = f"cw-e2e-{secrets.token_hex(3)}"
    webhook_name = f"sidecar-injector-{namespace}.costwarden.io"
    kubelet = ProcessKubelet(
        control_plane.kubeconfig_path, namespaces={namespace, *TEAM_NAMESPACES}
    ).start()
    # Under the kubelet's state dir: pods mount emptyDirs over /tmp, hiding pytest's tmp.
    workdir = kubelet.state_dir / "e2e"
    workdir.mkdir()
    upstream, server = fake_provider(kubelet, workdir)
    values = [
        "--set",
        "webhook.enabled=true",
        "--set",
        f"webhook.configurationName={webhook_name}",
        "--set",
        "providerKeys.namespaces={ai-platform}",
    ]
    documents = examples()
    try:
        started = time.monotonic()
        rendered = control_plane.helm(
            "template", RELEASE, str(CHART), "-n", namespace, *values
        ).stdout
        # docs/install-helm.md's order: the namespaces, the chart, the keys, examples/.
        apply(control_plane, [d for d in documents if d["kind"] == "Namespace"])
        control_plane.helm(
            "install", RELEASE, str(CHART), "--namespace", namespace, "--create-namespace", *values
        )
        for command in documented_secret_commands():
            control_plane.kubectl(*command)
        apply(control_plane, [*documents, team_policy()])
        deployment = Deployed(control_plane, api_client, kubelet, upstream, namespace, rendered)
        _wait_until_serving(deployment, webhook_name)
        print(f"installed and serving in {time.monotonic() - started:.1f}s")
        yield deployment
        latencies = sorted(round(x, 2) for x in kubelet.pod_start_latencies)
        print(f"pod start latencies (s): {latencies}")
    finally:
        try:
            _uninstall(control_plane, namespace, webhook_name, [*documents, team_policy()])
        finally:
            if request.session.testsfailed > failures_before:
                print(kubelet.all_logs())  # every container's log, for the failure
            kubelet.stop()
            server.stop()


def apply(plane: LocalControlPlane, documents: list[dict[str, Any]]) -> None:
    applied = plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents), check=False)
    assert applied.returncode == 0, applied.stderr


def _wait_until_serving(deployed: Deployed, webhook_name: str) -> None:
    plane, namespace = deployed.plane, deployed.namespace
    for name in ("operator", "gateway"):
        plane.kubectl(
            "rollout",
            "status",
            f"deployment/{RELEASE}-{name}",
            "-n",
            namespace,
            "--timeout=180s",
            timeout=200,
        )
    for kind, ns, name in (
        ("routingpolicy", "ai-platform", "standard"),
        ("teambudget", "team-payments", "payments"),
        ("teambudget", "team-support", "support"),
    ):
        wait_for(
            lambda kind=kind, ns=ns, name=name: (
                plane.kubectl(
                    "get",
                    kind,
                    name,
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                    check=False,
                ).stdout
                == "True"
            ),
            timeout=60,
            what=f"{kind} {ns}/{name} Ready",
        )
    # The webhook answers once the operator wrote its configuration and the Service routes
    # to the operator pod; a dry-run pod shows whether the API server gets the mutation.
    wait_for(lambda: _injects(plane), timeout=60, what=f"{webhook_name} injecting")


def _injects(plane: LocalControlPlane) -> bool:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "probe",
            "namespace": "team-payments",
            "labels": {"costwarden.io/inject": "true"},
        },
        "spec": {"containers": [{"name": "c", "image": "python:3.12"}]},
    }
    result = plane.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod), check=False
    )
    return result.returncode == 0 and bool(json.loads(result.stdout)["spec"].get("initContainers"))


def _uninstall(
    plane: LocalControlPlane, namespace: str, webhook: str, documents: list[dict[str, Any]]
) -> None:
    # Leave the team namespaces (other tests apply examples/ too) but not our objects.
    for ns in ("team-payments", "team-support"):
        plane.kubectl("delete", "jobs", "--all", "-n", ns, "--wait=false", check=False)
    budgets = [d for d in documents if d["kind"] != "Namespace"]
    if budgets:
        plane.kubectl(
            "delete",
            "--wait=false",
            "--ignore-not-found",
            "-f",
            "-",
            input=yaml.safe_dump_all(budgets),
            check=False,
        )
    plane.kubectl(
        "delete", "mutatingwebhookconfiguration", webhook, "--ignore-not-found", check=False
    )
    plane.helm("uninstall", RELEASE, "--namespace", namespace, check=False)
    plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# -- helpers ---------------------------------------------------------------------------------


def agent_job(
    name: str,
    tag: str,
    *,
    inject: bool,
    env: Iterable[dict[str, Any]] = (),
    volumes: Iterable[dict[str, Any]] = (),
    mounts: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    labels = {"costwarden.io/agent": "true", "costwarden.io/inject": str(inject).lower()}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "agent",
                            "image": "python:3.12-slim",
                            "command": ["python", "-c", AGENT, tag],
                            "env": list(env),
                            "volumeMounts": list(mounts),
                        }
                    ],
                    "volumes": list(volumes),
                },
            },
        },
    }


def shared_gateway_env(deployed: Deployed) -> list[dict[str, Any]]:
    """What docs/agents.md has an agent set for the shared gateway: its Service's URL."""
    url = f"http://{RELEASE}-gateway.{deployed.namespace}.svc:8000/v1"
    return [{"name": "OPENAI_BASE_URL", "value": url}]


def billed(calls: Iterable[ServedCall]) -> Decimal:
    """The exact price of the usage the provider reported: the bill costwarden must match."""
    backend = ModelBackend(
        name=MODEL, provider=Provider.OPENAI, endpoint="https://api.openai.com/v1"
    )
    pricing = resolve_pricing(backend, default_catalog())
    assert pricing is not None
    total = Decimal(0)
    for call in calls:
        usage = call.usage or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        tokens = TokenUsage(
            input=usage.get("prompt_tokens", 0) - cached,
            output=usage.get("completion_tokens", 0),
            cached_input=cached,
        )
        total += call_cost(tokens, pricing)
    return total


def calls_tagged(upstream: FakeUpstream, tag: str) -> list[ServedCall]:
    return [
        c
        for c in list(upstream.calls)
        if any(tag in str(m.get("content")) for m in c.body.get("messages", []))
    ]


def spend_matches(deployed: Deployed, namespace: str, budget: str, tag: str) -> bool:
    expected = billed(calls_tagged(deployed.upstream, tag))
    spent = deployed.budget_status(namespace, budget).get("spentExactUSD")
    return expected > 0 and spent is not None and Decimal(spent) == expected


# -- the tests -------------------------------------------------------------------------------


def test_injected_agent_job_is_metered_and_suspended_at_the_hard_cap(deployed: Deployed):
    started = time.monotonic()
    deployed.batch.create_namespaced_job(
        "team-payments", agent_job("summarize", "payments", inject=True)
    )
    pod = wait_for(
        lambda: next(iter(deployed.pods("team-payments", "summarize")), None),
        timeout=30,
        what="the agent pod",
    )
    sidecars = [c.name for c in pod.spec.init_containers or []]
    assert sidecars == ["costwarden-gateway"], sidecars

    job = wait_for(
        lambda: (j := deployed.job("team-payments", "summarize")) and j.spec.suspend and j,
        timeout=120,
        what="the Job suspended at the hard cap",
    )
    assert job.metadata.annotations["costwarden.io/stopped-reason"] == "HardCapReached"
    # The Job controller deletes a suspended Job's pods; the kubelet stops their processes.
    wait_for(
        lambda: not deployed.pods("team-payments", "summarize"),
        timeout=60,
        what="the suspended Job's pods gone",
    )
    # The team's own key (its Secret in team-payments, on the sidecar only) reached the
    # provider on every call.
    calls = calls_tagged(deployed.upstream, "payments call")
    assert calls
    assert {c.authorization for c in calls} == {f"Bearer {KEYS['$TEAM_PAYMENTS_OPENAI_KEY']}"}
    agent_env = [e.name for c in pod.spec.containers for e in c.env or []]
    assert not [name for name in agent_env if name.startswith("COSTWARDEN_CREDENTIAL_")]
    # Every call the provider billed reached the operator, once.
    wait_for(
        lambda: spend_matches(deployed, "team-payments", "payments", "payments call"),
        timeout=30,
        what="payments spend equal to the provider's bill",
    )
    print(f"sidecar path: capped and reconciled in {time.monotonic() - started:.1f}s")


def test_shared_gateway_agent_is_metered_and_deleted_at_the_hard_cap(deployed: Deployed):
    # docs/agents.md: a token projected for the gateway's audience identifies the pod.
    started = time.monotonic()
    env = [*shared_gateway_env(deployed), {"name": "TOKEN_FILE", "value": f"{TOKEN_DIR}/token"}]
    job = agent_job(
        "triage",
        "support",
        inject=False,
        env=env,
        volumes=[GATEWAY_TOKEN_VOLUME],
        mounts=[GATEWAY_TOKEN_MOUNT],
    )
    deployed.batch.create_namespaced_job("team-support", job)
    # examples/: the support team's agents are deleted at the hard cap (with propagation).
    wait_for(
        lambda: deployed.job("team-support", "triage") is None,
        timeout=120,
        what="the Job deleted at the hard cap",
    )
    wait_for(
        lambda: not deployed.pods("team-support", "triage"),
        timeout=60,
        what="the deleted Job's pods gone",
    )
    # The platform's key (ai-platform's Secret, mirrored by the operator) reached the provider.
    calls = calls_tagged(deployed.upstream, "support call")
    assert calls
    assert {c.authorization for c in calls} == {f"Bearer {KEYS['$OPENAI_API_KEY']}"}
    wait_for(
        lambda: spend_matches(deployed, "team-support", "support", "support call"),
        timeout=30,
        what="support spend equal to the provider's bill",
    )
    print(f"shared gateway path: capped and reconciled in {time.monotonic() - started:.1f}s")


def _one_call_job(deployed: Deployed, name: str, env: list[dict[str, Any]]) -> str:
    """Run an agent that makes one call; its pod's phase is the verdict."""
    body = agent_job(name, name, inject=False, env=[*env, {"name": "ONE_CALL", "value": "1"}])
    deployed.batch.create_namespaced_job("team-support", body)
    job = wait_for(
        lambda: (
            (j := deployed.job("team-support", name))
            and j.status
            and (j.status.succeeded or j.status.failed)
            and j
        ),
        timeout=60,
        what=f"Job {name} finished",
    )
    return "Succeeded" if job.status.succeeded else "Failed"


def test_shared_gateway_refuses_the_pods_default_token(deployed: Deployed):
    # docs/agents.md: the API server's own token is never accepted by the gateway.
    default = {"name": "TOKEN_FILE", "value": "/var/run/secrets/kubernetes.io/serviceaccount/token"}
    # The support team may be over its cap from the test before (its new Jobs would be
    # deleted at once): the platform team raises it first, and exempts this Job, which is
    # about the token alone (a Job created while the operator's view of the raised cap
    # settles could otherwise still be stopped; that window is not what this test checks).
    client.CustomObjectsApi(deployed.api).patch_namespaced_custom_object(
        "costwarden.io", "v1alpha1", "team-support", "teambudgets", "support",
        {"spec": {"hardCapUSD": "5", "exemptions": {"jobNames": ["default-token"]}}},
    )  # fmt: skip
    wait_for(lambda: deployed.budget_status("team-support", "support").get("phase") == "Active",
             timeout=30, what="the support budget Active again")  # fmt: skip
    assert _one_call_job(deployed, "default-token", [*shared_gateway_env(deployed), default]) == (
        "Failed"
    )
    log = deployed.kubelet.logs(
        "team-support", deployed.pods("team-support", "default-token")[0].metadata.name, "agent"
    )
    assert "refused 401" in log, log
