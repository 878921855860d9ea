"""A throw-away Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager).

This is the envtest approach: real API machinery, no kubelet or scheduler, so pods stay
Pending. The admin identity is a client certificate in group ``system:masters`` signed by a
CA created here; the kubeconfig embeds it, which works alike for the Python ``kubernetes``
client, kubectl, helm and the controller manager, and keeps TLS verification on.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import yaml

from costwarden.children import exit_with_parent, terminate
from costwarden.cluster.binaries import (
    APISERVER,
    CONTROLLER_MANAGER,
    ETCD,
    ensure_cli_tools,
    missing_binaries,
    tail,
)
from costwarden.cluster.binaries import ensure_control_plane_binaries as _ensure_binaries
from costwarden.cluster.pki import ClusterPki, write_cluster_pki
from costwarden.ports import free_ports

logger = logging.getLogger(__name__)

CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    # What the chart's pods need once a (process) kubelet runs them: Deployments and their
    # ReplicaSets, and the kube-root-ca.crt ConfigMap every service-account volume projects.
    "deployment-controller",
    "replicaset-controller",
    "root-ca-certificate-publisher-controller",
)
SERVICE_SUPERNET = "10.96.0.0/12"
"""Each control plane takes its own /24 of this for ClusterIPs: a process kubelet serves
them on host addresses, so two clusters on one machine must not share a range."""
CONTEXT_NAME = "costwarden-local"
ADMIN_USER = "costwarden-admin"
_POLL_INTERVAL = 0.1
_START_ATTEMPTS = 3
_PORT_CONFLICT_MARKERS = ("address already in use", "bind: address")


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or a component died."""


class _PortConflictError(ControlPlaneError):
    """A picked port was taken between choosing and binding it; worth a retry."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class LocalControlPlane:
    """Start etcd, kube-apiserver and optionally kube-controller-manager on 127.0.0.1.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``workdir`` holds the
    PKI, etcd data, logs (``logs/<component>.log``) and the kubeconfig; a temporary one is
    created (and removed on stop) unless given. A given workdir is kept, but its etcd data
    is wiped on start so every start is a fresh cluster.

    Children are put in their own session (so a terminal Ctrl-C reaches only us and we shut
    them down in order) and, on Linux, get SIGKILL when the thread that started them dies
    (``die_with_parent``), so a killed test run leaves no orphan etcd. Start the control
    plane from a long-lived thread (normally the main thread) for that reason.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        with_controller_manager: bool = True,
        binaries_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_apiserver_args: Sequence[str] = (),
        die_with_parent: bool = True,
        service_cluster_ip_range: str | None = None,
    ) -> None:
        self.with_controller_manager = with_controller_manager
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._binaries_dir = Path(binaries_dir) if binaries_dir is not None else None
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._children: list[_Child] = []
        self._pki: ClusterPki | None = None
        self._apiserver_port: int | None = None
        self._etcd_ports: tuple[int, int] | None = None
        self._tools_dir: Path | None = None
        self._started = False
        self.service_cluster_ip_range = service_cluster_ip_range or _pick_service_range()

    # -- public properties -----------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("control plane not started")
        return self._workdir

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server_url(self) -> str:
        if self._apiserver_port is None:
            raise ControlPlaneError("control plane not started")
        return f"https://127.0.0.1:{self._apiserver_port}"

    @property
    def ca_cert_path(self) -> Path:
        return self._require_pki().ca_cert

    @property
    def binaries_dir(self) -> Path:
        if self._binaries_dir is None:
            raise ControlPlaneError("control plane not started")
        return self._binaries_dir

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalControlPlane:
        """Start all components and wait until the cluster is usable; returns self."""
        if self._started:
            raise ControlPlaneError("control plane already started")
        self._started = True
        # Registered before anything is spawned so a crash mid-start still cleans up.
        atexit.register(self.stop)
        started_at = time.monotonic()
        try:
            self._prepare()
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    self._launch()
                    break
                except _PortConflictError:
                    if attempt == _START_ATTEMPTS:
                        raise
                    logger.warning("port conflict while starting, retrying (%d)", attempt)
                    self._terminate_children()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "control plane up at %s in %.1fs (kubeconfig %s)",
            self.server_url,
            time.monotonic() - started_at,
            self.kubeconfig_path,
        )
        return self

    def stop(self) -> None:
        """Terminate all children (SIGTERM, then SIGKILL after ``stop_timeout``). Idempotent."""
        atexit.unregister(self.stop)
        self._terminate_children()
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None if self._owns_workdir else self._workdir
        self._apiserver_port = None
        self._started = False

    # -- faults: one component stopped and started again (tests/faults) -----------------

    def stop_apiserver(self, *, kill: bool = False) -> None:
        """Stop kube-apiserver alone (etcd and the controller manager keep running):
        SIGTERM, or SIGKILL with ``kill``. :meth:`start_apiserver` brings it back."""
        self._stop_component(APISERVER, kill=kill)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port, over the same etcd; returns once it
        is ready. Clients keep their kubeconfig."""
        if self._etcd_ports is None or self._apiserver_port is None:
            raise ControlPlaneError("control plane not started")
        self._start_apiserver(self._etcd_ports[0], self._apiserver_port)

    def stop_etcd(self, *, kill: bool = False) -> None:
        """Stop etcd alone (its data is kept); kube-apiserver stays up, answering errors."""
        self._stop_component(ETCD, kill=kill)

    def start_etcd(self) -> None:
        """Start etcd again on the same ports with the same data; returns once healthy."""
        if self._etcd_ports is None:
            raise ControlPlaneError("control plane not started")
        self._start_etcd(*self._etcd_ports, wipe=False)

    def _stop_component(self, name: str, *, kill: bool) -> None:
        child = next((c for c in self._children if c.name == name), None)
        if child is None:
            raise ControlPlaneError(f"{name} is not running")
        self._children.remove(child)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            child.process.wait(self.stop_timeout)
        else:
            terminate(child.process, self.stop_timeout)
        child.log_file.close()
        logger.info("%s stopped (%s)", name, "SIGKILL" if kill else "SIGTERM")

    def check_alive(self) -> None:
        """Raise :class:`ControlPlaneError` (with log tails) if any component has exited."""
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                raise self._failure(f"{child.name} exited with code {code}", child)

    # -- clients ---------------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this cluster; output captured as text."""
        cache_dir = self.workdir / "kubectl-cache"
        return self._run_tool(
            "kubectl",
            ["--kubeconfig", str(self.kubeconfig_path), "--cache-dir", str(cache_dir), *args],
            check=check,
            timeout=timeout,
            input=input,
        )

    def helm(
        self, *args: str, check: bool = True, timeout: float = 300.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached helm against this cluster; its state dirs live in the workdir."""
        return self._run_tool(
            "helm",
            ["--kubeconfig", str(self.kubeconfig_path), *args],
            check=check,
            timeout=timeout,
            input=input,
        )

    def _run_tool(
        self, tool: str, args: list[str], *, check: bool, timeout: float, input: str | None
    ) -> subprocess.CompletedProcess[str]:
        if self._tools_dir is None:
            self._tools_dir = ensure_cli_tools()
        helm_home = self.workdir / "helm"
        # Keep helm's repositories/cache per cluster instead of in the user's home.
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig_path),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }
        command = [str(self._tools_dir / tool), *args]
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, command, output=result.stdout, stderr=result.stderr
            )
        return result

    # -- start-up steps --------------------------------------------------------------

    def _prepare(self) -> None:
        if self._binaries_dir is None:
            self._binaries_dir = _ensure_binaries(
                require_controller_manager=self.with_controller_manager
            )
        needed = (ETCD, APISERVER) + ((CONTROLLER_MANAGER,) if self.with_controller_manager else ())
        missing = missing_binaries(self._binaries_dir, needed)
        if missing:
            raise ControlPlaneError(f"{self._binaries_dir} lacks executable {', '.join(missing)}")
        self._owns_workdir = self._given_workdir is None
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self._workdir = self._given_workdir.resolve()
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="costwarden-cp-"))
        self.log_dir.mkdir(exist_ok=True)
        self._pki = write_cluster_pki(
            self.workdir / "pki",
            admin_user=ADMIN_USER,
            service_cluster_ip_range=self.service_cluster_ip_range,
        )

    def _launch(self) -> None:
        etcd_port, etcd_peer_port, apiserver_port = free_ports(3)
        self._etcd_ports = (etcd_port, etcd_peer_port)
        self._start_etcd(etcd_port, etcd_peer_port)
        self._apiserver_port = apiserver_port
        self._start_apiserver(etcd_port, apiserver_port)
        self._write_kubeconfig()
        if self.with_controller_manager:
            self._start_controller_manager()

    def _start_etcd(self, client_port: int, peer_port: int, *, wipe: bool = True) -> None:
        data_dir = self.workdir / "etcd"
        if wipe:
            shutil.rmtree(data_dir, ignore_errors=True)
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        child = self._spawn(
            ETCD,
            [
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Throw-away data: durability only costs start-up and test time.
                "--unsafe-no-fsync",
            ],
        )
        self._wait_until("etcd /health", child, lambda: _etcd_healthy(client_port))

    def _start_apiserver(self, etcd_port: int, port: int) -> None:
        pki = self._require_pki()
        child = self._spawn(
            APISERVER,
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer=https://127.0.0.1:{port}",
                f"--service-account-key-file={pki.sa_public_key}",
                f"--service-account-signing-key-file={pki.sa_private_key}",
                f"--service-cluster-ip-range={self.service_cluster_ip_range}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                *self.extra_apiserver_args,
            ],
        )
        context = self._admin_ssl_context()
        self._wait_until(
            "kube-apiserver /readyz", child, lambda: _https_get(port, "/readyz", context)[0] == 200
        )

    def _start_controller_manager(self) -> None:
        pki = self._require_pki()
        child = self._spawn(
            CONTROLLER_MANAGER,
            [
                f"--kubeconfig={self.kubeconfig_path}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={pki.sa_private_key}",
                f"--root-ca-file={pki.ca_cert}",
                # As kubeadm runs it: each controller acts as its own service account
                # (system:serviceaccount:kube-system:job-controller, ...), which admission
                # webhooks see as the pod's creator (the injector trusts only the Job
                # controller's owner reference).
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )
        # Without the default ServiceAccount the API server refuses pods in a namespace.
        port = self._apiserver_port
        assert port is not None
        context = self._admin_ssl_context()
        path = "/api/v1/namespaces/default/serviceaccounts/default"
        self._wait_until(
            "the default ServiceAccount (created by kube-controller-manager)",
            child,
            lambda: _https_get(port, path, context)[0] == 200,
        )

    def _write_kubeconfig(self) -> None:
        pki = self._require_pki()

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CONTEXT_NAME,
                    "cluster": {
                        "server": self.server_url,
                        "certificate-authority-data": b64(pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate-data": b64(pki.admin_cert),
                        "client-key-data": b64(pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": ADMIN_USER}}
            ],
            "current-context": CONTEXT_NAME,
        }
        # Write then rename so a concurrent reader never sees half a kubeconfig.
        tmp = self.kubeconfig_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.chmod(0o600)
        tmp.replace(self.kubeconfig_path)

    # -- process handling ------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> _Child:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        log_file.write(f"$ {name} {' '.join(args)}\n".encode())
        log_file.flush()
        try:
            process = subprocess.Popen(
                [str(self.binaries_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=exit_with_parent(signal.SIGKILL) if self.die_with_parent else None,
            )
        except BaseException:
            log_file.close()
            raise
        child = _Child(name, process, log_path, log_file)
        self._children.append(child)
        logger.debug("started %s (pid %d), log %s", name, process.pid, log_path)
        return child

    def _wait_until(self, what: str, child: _Child, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    return
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"timed out after {self.start_timeout:.0f}s waiting for {what}", child
                )
            time.sleep(_POLL_INTERVAL)  # polling interval, not synchronisation

    def _failure(self, message: str, culprit: _Child) -> ControlPlaneError:
        sections = [message]
        for child in self._children:
            child.log_file.flush()
            sections.append(f"--- {child.log_path} (tail) ---\n{tail(child.log_path)}")
        text = "\n".join(sections)
        culprit_log = tail(culprit.log_path).lower()
        if culprit.process.poll() is not None and any(
            marker in culprit_log for marker in _PORT_CONFLICT_MARKERS
        ):
            return _PortConflictError(text)
        return ControlPlaneError(text)

    def _terminate_children(self) -> None:
        # Reverse start order: controller manager, then apiserver, then etcd underneath.
        while self._children:
            child = self._children.pop()
            terminate(child.process, self.stop_timeout)
            child.log_file.close()

    # -- helpers ---------------------------------------------------------------------

    def _require_pki(self) -> ClusterPki:
        if self._pki is None:
            raise ControlPlaneError("control plane not started")
        return self._pki

    def _admin_ssl_context(self) -> ssl.SSLContext:
        pki = self._require_pki()
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return context


def _pick_service_range() -> str:
    """A /24 of :data:`SERVICE_SUPERNET` no interface or route of this host uses."""
    supernet = ipaddress.IPv4Network(SERVICE_SUPERNET)
    used: list[ipaddress.IPv4Network] = []
    if shutil.which("ip"):
        from costwarden.cluster.kubelet.network import used_networks

        used = used_networks()
    subnets = list(supernet.subnets(new_prefix=24))
    for _ in range(100):
        candidate = random.choice(subnets)  # noqa: S311  (not security relevant)
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)
    raise ControlPlaneError(f"no free /24 in {SERVICE_SUPERNET} for ClusterIPs")


def _etcd_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status == 200 and json.loads(body).get("health") == "true"


def _https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
