"""The whole costwarden stack for end-to-end tests: fake upstream, operator process,
gateway process reporting to it, and the gateway's configuration mirrored from the
operator's ConfigMap into a file (as a kubelet's ConfigMap volume would)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
from kubernetes import client

from costwarden.api.catalog import default_catalog
from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME
from costwarden.api.routingpolicy import ModelBackend, Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.policy.pricing import call_cost, resolve_pricing
from costwarden.ports import free_port
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

GROUP, VERSION = "costwarden.io", "v1alpha1"
MODEL = "gpt-4o-mini"


def budget_manifest(name: str, hard_cap: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TeamBudget",
        "metadata": {"name": name},
        "spec": {
            "hardCapUSD": hard_cap,
            "routingPolicyRef": {"name": "routing"},
            "workloads": {"selector": {"matchLabels": {"team": name}}},
            **spec,
        },
    }


def policy_manifest(upstream_url: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": "routing"},
        "spec": {
            # The local upstream stands in for a model served inside the cluster: an External
            # model may not live on a loopback or private address (api/endpoints.py).
            "models": [
                {
                    "name": MODEL,
                    "provider": "OpenAI",
                    "endpoint": f"{upstream_url}/v1",
                    "locality": "InCluster",
                }
            ],
            "defaultModel": MODEL,
            # The agents here send no max_tokens; the caps are a few calls' worth, which a
            # call reserving the 8,192-token default ceiling would not fit (docs/gateway.md).
            "defaultMaxOutputTokens": 32,
        },
    }


def job_manifest(name: str, team: str) -> dict[str, Any]:
    """An agent Job; without a kubelet its pod stays Pending, which enforcement needs not."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"team": team}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"team": team}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "agent", "image": "busybox", "command": ["true"]}],
                },
            },
        },
    }


def upstream_cost(upstream: FakeUpstream) -> Decimal:
    """The exact price of every usage the upstream reported (the bill costwarden must match)."""
    backend = ModelBackend(
        name=MODEL, provider=Provider.OPENAI, endpoint="https://api.example.com/v1"
    )
    resolved = resolve_pricing(backend, default_catalog())
    assert resolved is not None
    total = Decimal(0)
    for call in list(upstream.calls):
        usage = call.usage or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        tokens = TokenUsage(
            input=usage.get("prompt_tokens", 0) - cached,
            output=usage.get("completion_tokens", 0),
            cached_input=cached,
        )
        total += call_cost(tokens, resolved)
    return total


def floor6(amount: Decimal) -> str:
    text = format(amount.quantize(Decimal("0.000001"), rounding=ROUND_FLOOR), "f").rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


class ConfigMirror:
    """Copies the gateway ConfigMap into a file whenever it changes (every 0.1 s)."""

    def __init__(self, api_client: client.ApiClient, namespace: str, path: Path) -> None:
        self._core = client.CoreV1Api(api_client)
        self._namespace = namespace
        self.path = path
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sync(self) -> bool:
        with self._lock:  # the mirror thread and the test thread both sync
            try:
                cm = self._core.read_namespaced_config_map(CONFIG_MAP_NAME, self._namespace)
            except Exception:  # an API error, or none at all (the API server down: faults)
                return False
            text = (cm.data or {}).get(CONFIG_MAP_KEY, "")
            if text and text != self._last:
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(text)
                os.replace(temporary, self.path)
                self._last = text
            return bool(text)

    def has_team(self, team: str) -> bool:
        self.sync()
        return bool(self._last) and any(t["id"] == team for t in json.loads(self._last)["teams"])

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sync()

    def start(self) -> ConfigMirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Gateway:
    """A `costwarden gateway` process with per-job team keys and a reporting ledger."""

    workdir: Path
    config: Path
    report_to: str
    token_file: Path
    report_ca: Path
    port: int = field(default_factory=free_port)
    keys: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()
    """More `costwarden gateway` arguments, e.g. ("--credentials-dir", path)."""
    ledger_dir: Path | None = None
    """Where the ledger lives (default: the workdir), e.g. a small volume (faults)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger(self) -> Path:
        return (self.ledger_dir or self.workdir) / "ledger.jsonl"

    def add_key(self, team: str, namespace: str, job: str) -> str:
        key = f"cw-{job}-{secrets.token_hex(8)}"
        self.keys[hashlib.sha256(key.encode()).hexdigest()] = json.dumps(
            {"team": team, "namespace": namespace, "job": job}
        )
        self.write_keys()
        return key

    def write_keys(self) -> None:
        lines = [f"{digest}: {entry}" for digest, entry in self.keys.items()]
        (self.workdir / "keys.yaml").write_text("\n".join(lines or ["{}"]) + "\n")

    def replica(self, name: str) -> Gateway:
        """Another replica of this gateway (same configuration, keys and operator), with
        its own ledger and so its own usage source and lease; started."""
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        other = Gateway(
            workdir, self.config, self.report_to, self.token_file, self.report_ca,
            keys=dict(self.keys), extra_args=self.extra_args,
        )  # fmt: skip
        other.write_keys()
        return other.start()

    def start(self) -> Gateway:
        log = (self.workdir / "gateway.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "costwarden", "gateway",
                "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port),
                "--mode", "shared", "--api-keys-file", str(self.workdir / "keys.yaml"),
                "--ledger", str(self.ledger), "--ledger-fsync", "none",
                "--report-to", self.report_to, "--report-token-file", str(self.token_file),
                "--report-ca-file", str(self.report_ca),
                "--replica-id", "gw-test", "--log-level", "WARNING", *self.extra_args,
            ],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        wait_for(self._ready, timeout=30, what="gateway ready")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"gateway exited: {self.logs()}")
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def logs(self) -> str:
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def agent(self, team: str, namespace: str, job: str) -> openai.OpenAI:
        """An openai SDK client with a team key for ``job``, once the gateway knows both
        (it polls its configuration and keys files about once a second)."""
        key = self.add_key(team, namespace, job)
        wait_for(lambda: self._knows(key), timeout=30, what=f"gateway serving {team}")
        return self.client(key)

    def _knows(self, key: str) -> bool:
        answer = httpx.get(
            self.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
        )
        return answer.status_code == 200 and bool(answer.json()["data"])

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=10)


@dataclass
class Stack:
    plane: Any
    api_client: client.ApiClient
    workdir: Path
    upstream: FakeUpstream
    upstream_url: str
    token_file: Path
    operator: OperatorProcess
    ingest_port: int
    mirror: ConfigMirror
    gateway: Gateway

    @property
    def ingest_url(self) -> str:
        return f"https://127.0.0.1:{self.ingest_port}/v1/usage"

    @property
    def ingest_ca(self) -> Path:
        return self.workdir / "ingest-tls" / "ca.crt"

    def ingest_client(self) -> httpx.Client:
        return httpx.Client(verify=ingest_tls(self.ingest_ca), timeout=10)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        if body["kind"] == "Job":
            self.batch.create_namespaced_job(namespace, body)
            return
        plural = "teambudgets" if body["kind"] == "TeamBudget" else "routingpolicies"
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)

    def budget(self, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "teambudgets", name
        )
        return obj

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.budget(namespace, name).get("status") or {})

    def job(self, namespace: str, name: str) -> Any:
        return self.batch.read_namespaced_job(name, namespace)

    def team(self, namespace: str, name: str, hard_cap: str, **spec: Any) -> str:
        """A RoutingPolicy and TeamBudget in ``namespace``, in the gateway's configuration."""
        self.create(namespace, policy_manifest(self.upstream_url))
        self.create(namespace, budget_manifest(name, hard_cap, **spec))
        team = f"{namespace}/{name}"
        wait_for(lambda: self.mirror.has_team(team), timeout=30, what=f"{team} in gateway config")
        # The gateway polls its file once a second; a call before that is refused as no team.
        return team

    def restart_operator(self, sig: int = signal.SIGKILL) -> None:
        assert self.operator.process is not None
        self.operator.process.send_signal(sig)
        self.operator.process.wait(30)
        self.operator.start()


def _listening(port: int, ca: Path) -> bool:
    if not ca.exists():
        return False
    try:
        answer = httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=1, verify=ingest_tls(ca))
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def ingest_tls(ca: Path) -> ssl.SSLContext:
    """Verifies the operator's ingestion certificate (served over HTTPS only)."""
    return ssl.create_default_context(cafile=str(ca))


def start_operator(
    kubeconfig: str,
    workdir: Path,
    port: int,
    token_file: Path,
    *extra: str,
    peering: str | None = None,
) -> OperatorProcess:
    """``peering``: run in Kopf peering mode (as the chart does) with that
    ClusterKopfPeering and a 10 s keep-alive; else ``--standalone``."""
    mode = ("--peering-name", peering, "--peering-lifetime", "10") if peering else ("--standalone",)
    return OperatorProcess(
        kubeconfig, "costwarden-system", workdir / "operator.log", *mode,
        "--ingest-port", str(port), "--ingest-token-file", str(token_file),
        "--ingest-listen-address", "127.0.0.1",
        "--ingest-cert-dir", str(workdir / "ingest-tls"), *extra,
    ).start()  # fmt: skip


@contextmanager
def running_stack(
    plane: Any,
    api_client: client.ApiClient,
    workdir: Path,
    *operator_args: str,
    peering: str | None = None,
    gateway_args: tuple[str, ...] = (),
) -> Iterator[Stack]:
    plane.kubectl("create", "namespace", "costwarden-system", check=False)
    upstream = FakeUpstream()
    token_file = workdir / "ingest-token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    port = free_port()
    with ServerThread(upstream.app) as upstream_server:
        operator = start_operator(
            str(plane.kubeconfig_path),
            workdir,
            port,
            token_file,
            *operator_args,
            peering=peering,
        )
        ca = workdir / "ingest-tls" / "ca.crt"
        wait_for(lambda: _listening(port, ca), timeout=60, what="the operator's ingestion port")
        config = workdir / "gateway-config.json"
        mirror = ConfigMirror(api_client, "costwarden-system", config)
        wait_for(mirror.sync, timeout=60, what="the operator's gateway ConfigMap")
        mirror.start()
        gateway = Gateway(
            workdir, config, f"https://127.0.0.1:{port}", token_file, ca, extra_args=gateway_args
        )
        (workdir / "keys.yaml").write_text("{}\n")
        gateway.start()
        try:
            yield Stack(
                plane, api_client, workdir, upstream, upstream_server.url, token_file,
                operator, port, mirror, gateway,
            )  # fmt: skip
        finally:
            gateway.stop()
            mirror.stop()
            operator.stop()
