"""Everything the demo runs: a cluster, the operator, a model upstream and the gateway.

Each piece is a real process (the same entry points a cluster runs), with its log in the
demo's work directory; ``DemoStack`` stops them all on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME
from costwarden.cluster import LocalControlPlane, ensure_cli_tools, ensure_control_plane_binaries
from costwarden.demo import manifests
from costwarden.testing.processes import ManagedProcess, free_port

REPO_FILES = Path(__file__).resolve().parents[3]
CONFIG_SYNC_SECONDS = 0.25


@dataclass
class DemoStack:
    """The running pieces; built step by step by the scenario, torn down by ``close``."""

    workdir: Path
    kubeconfig: Path | None = None
    plane: LocalControlPlane | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    upstream_url: str = ""
    gateway_url: str = ""
    ingest_url: str = ""
    config_file: Path | None = None
    _stop_sync: threading.Event = field(default_factory=threading.Event)
    _api: client.ApiClient | None = None

    # -- cluster ---------------------------------------------------------------------

    def start_local_cluster(self) -> None:
        self.plane = LocalControlPlane(
            self.workdir / "cluster",
            binaries_dir=ensure_control_plane_binaries(),
            with_controller_manager=True,
        ).start()
        self.kubeconfig = self.plane.kubeconfig_path

    def use_kubeconfig(self, path: Path) -> None:
        self.kubeconfig = path

    @property
    def api(self) -> client.ApiClient:
        if self._api is None:
            assert self.kubeconfig is not None
            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def kubectl(self, *args: str, input: str | None = None) -> str:
        """kubectl from the cached tools, on the demo's cluster; output as text."""
        assert self.kubeconfig is not None
        kubectl = ensure_cli_tools() / "kubectl"
        result = subprocess.run(
            [str(kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def apply(self, *documents: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))

    def apply_path(self, path: Path) -> None:
        self.kubectl("apply", "--server-side", "-f", str(path))

    # -- processes -------------------------------------------------------------------

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(
            name, [sys.executable, "-m", "costwarden", *args], self.workdir / f"{name}.log", env
        ).start()
        self.processes.append(process)
        return process

    @property
    def ingest_token_file(self) -> Path:
        """A shared token between the gateway and the operator's ingestion endpoint (in a
        cluster the gateway presents its service-account token instead)."""
        path = self.workdir / "ingest-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
        return path

    def start_operator(self) -> ManagedProcess:
        assert self.kubeconfig is not None
        health, ingest = free_port(), free_port()
        process = self._spawn(
            "operator",
            "operator", "--standalone", "--kubeconfig", str(self.kubeconfig),
            "--namespace", manifests.OPERATOR_NAMESPACE,
            "--metrics-port", str(free_port()), "--health-port", str(health),
            "--ingest-port", str(ingest), "--ingest-listen-address", "127.0.0.1",
            "--ingest-token-file", str(self.ingest_token_file),
            "--ingest-cert-dir", str(self.workdir / "ingest-tls"),
        )  # fmt: skip
        # Ingestion is HTTPS only; the gateway verifies it against the operator's CA.
        self.ingest_url = f"https://127.0.0.1:{ingest}"
        process.wait_http_ok(f"http://127.0.0.1:{health}/healthz", timeout=60)
        return process

    def start_upstream(self) -> ManagedProcess:
        port = free_port()
        process = self._spawn("upstream", "upstream", "--host", "127.0.0.1", "--port", str(port))
        self.upstream_url = f"http://127.0.0.1:{port}"
        process.wait_http_ok(f"{self.upstream_url}/v1/models")
        return process

    def start_gateway_sidecar(self, pod: str, labels: dict[str, str]) -> ManagedProcess:
        """The gateway as the agent pod's sidecar: the pod is the caller (downward API)."""
        assert self.config_file is not None
        labels_file = self.workdir / "podinfo" / "labels"
        labels_file.parent.mkdir(parents=True, exist_ok=True)
        labels_file.write_text("".join(f'{k}="{v}"\n' for k, v in sorted(labels.items())))
        port = free_port()
        process = self._spawn(
            "gateway",
            "gateway", "--mode", "sidecar", "--host", "127.0.0.1", "--port", str(port),
            "--config", str(self.config_file), "--pod-labels-file", str(labels_file),
            "--ledger", str(self.workdir / "usage.jsonl"),
            "--report-to", self.ingest_url, "--report-token-file", str(self.ingest_token_file),
            "--report-ca-file", str(self.workdir / "ingest-tls" / "ca.crt"),
            env={"POD_NAMESPACE": manifests.DEMO_NAMESPACE, "POD_NAME": pod},
        )  # fmt: skip
        self.gateway_url = f"http://127.0.0.1:{port}"
        process.wait_http_ok(f"{self.gateway_url}/healthz")
        return process

    # -- the gateway configuration, as a ConfigMap volume would deliver it -----------

    def start_config_sync(self) -> None:
        """Mirror the operator's ConfigMap into a file, as the kubelet does for a volume."""
        self.config_file = self.workdir / "gateway" / "gateway-config.json"
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self._sync_once(wait=True)
        thread = threading.Thread(target=self._sync_forever, name="config-sync", daemon=True)
        thread.start()

    def _read_config(self) -> str | None:
        core = client.CoreV1Api(self.api)
        try:
            cm = core.read_namespaced_config_map(CONFIG_MAP_NAME, manifests.OPERATOR_NAMESPACE)
        except client.ApiException:
            return None
        data: str | None = (cm.data or {}).get(CONFIG_MAP_KEY)
        return data

    def _sync_once(self, wait: bool = False) -> None:
        assert self.config_file is not None
        deadline = time.monotonic() + 60
        while True:
            text = self._read_config()
            if text or not wait or time.monotonic() > deadline:
                break
            time.sleep(CONFIG_SYNC_SECONDS)
        if text and (not self.config_file.exists() or self.config_file.read_text() != text):
            staging = self.config_file.with_suffix(".tmp")
            staging.write_text(text)
            staging.replace(self.config_file)  # atomic, like the kubelet's symlink swap

    def _sync_forever(self) -> None:
        while not self._stop_sync.wait(CONFIG_SYNC_SECONDS):
            with contextlib.suppress(Exception):  # a blip of the API server: next round
                self._sync_once()

    def config_revision(self) -> str:
        if self.config_file is None or not self.config_file.exists():
            return ""
        return str(json.loads(self.config_file.read_text()).get("revision", ""))

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        self._stop_sync.set()
        for process in reversed(self.processes):
            process.stop(timeout=10)
        if self._api is not None:
            self._api.close()
        if self.plane is not None:
            self.plane.stop()


@contextlib.contextmanager
def demo_stack(workdir: Path | None) -> Iterator[DemoStack]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="costwarden-demo-"))
            )
        workdir.mkdir(parents=True, exist_ok=True)
        demo = DemoStack(workdir=workdir)
        stack.callback(demo.close)
        yield demo


def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
