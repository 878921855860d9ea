"""The process kubelet: a Node for the local control plane that runs Pods as processes.

It binds unscheduled pods to its Node (there is no scheduler), runs each pod in its own
network namespace with the pod's volumes mounted (``pods.py``), serves Services with a
userspace proxy (``proxy.py``) and writes pod status through the status subresource.
Everything a container gets comes from the Pod spec and the objects it references, so a
chart whose wiring is wrong fails here as it would on a real node.

Runs its own asyncio loop in a thread; the synchronous ``kubernetes`` client is called
from a thread pool. A watch on pods wakes the sync loop at once; Services, Secrets and
ConfigMaps are re-read every ``sync_period`` (volumes are kept current at that pace).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from costwarden.cluster.kubelet.network import STATE_ROOT, PodNetwork, remove_stale
from costwarden.cluster.kubelet.pods import PodWorker, now
from costwarden.cluster.kubelet.podspec import (
    ImageMap,
    Json,
    LocalImage,
    NodeInfo,
    Sources,
    container_port,
    selector_matches,
)
from costwarden.cluster.kubelet.proxy import Backend, ServiceProxy

log = logging.getLogger(__name__)

NODE_NAME = "costwarden-local"
TOKEN_REFRESH_FRACTION = 0.8  # the kubelet renews a projected token at 80% of its life


def default_image_map(project_env: Mapping[str, str] | None = None) -> ImageMap:
    """The project image runs the venv's ``costwarden`` console script (the Dockerfile's
    ENTRYPOINT and CMD); ``python:*`` images run the venv's python; anything else runs its
    ``command`` with the host's PATH. ``project_env`` adds ENV to the project image (e.g.
    ``SSL_CERT_FILE``: an image built with a private CA in its trust store)."""
    bin_dir = str(Path(sys.executable).parent)
    path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    project = LocalImage(
        entrypoint=(f"{bin_dir}/costwarden",),
        cmd=("operator",),
        workdir="/tmp",  # noqa: S108  (the Dockerfile's WORKDIR)
        env={"PATH": path, **(project_env or {})},
    )
    python = LocalImage(cmd=("python3",), env={"PATH": path})
    other = LocalImage(env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    return ImageMap(
        (
            ("costwarden/costwarden:*", project),
            ("costwarden/costwarden@*", project),
            ("*/costwarden/costwarden:*", project),
            ("python:*", python),
            ("python", python),
            ("*", other),
        )
    )


class _Snapshot(Sources):
    """Secrets and ConfigMaps as of the last sync, and a TokenRequest cache."""

    def __init__(self, kubelet: ProcessKubelet) -> None:
        self._kubelet = kubelet
        self.secrets: dict[tuple[str, str], dict[str, bytes]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, bytes]] = {}
        self._tokens: dict[tuple[str, str | None, int], tuple[str, float]] = {}

    def secret(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        return self.secrets.get((namespace, name))

    def config_map(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        return self.config_maps.get((namespace, name))

    def token(self, pod: Json, audience: str | None, expiration_seconds: int) -> str:
        key = (pod["metadata"]["uid"], audience, expiration_seconds)
        cached = self._tokens.get(key)
        if cached is not None and time.time() < cached[1]:
            return cached[0]
        token, expires = self._kubelet.request_token(pod, audience, expiration_seconds)
        issued = time.time()
        self._tokens[key] = (token, issued + (expires - issued) * TOKEN_REFRESH_FRACTION)
        return token

    def forget(self, uid: str) -> None:
        for key in [k for k in self._tokens if k[0] == uid]:
            del self._tokens[key]


class ProcessKubelet:
    """Start with :meth:`start` (or as a context manager); :meth:`stop` ends every pod."""

    def __init__(
        self,
        kubeconfig: str | Path,
        *,
        node_name: str = NODE_NAME,
        state_dir: Path | None = None,
        images: ImageMap | None = None,
        sync_period: float = 1.0,
        max_grace_seconds: float = 5.0,
        namespaces: Collection[str] | None = None,
        extra_hosts: Mapping[str, str] | None = None,
    ) -> None:
        self.kubelet_id = secrets.token_hex(3)
        self.node_name = node_name
        self.state_dir = state_dir or STATE_ROOT / self.kubelet_id
        self.images = images or default_image_map()
        self.sync_period = sync_period
        self.max_grace_seconds = max_grace_seconds
        # Names every pod resolves to these addresses, standing in for the cluster's upstream
        # DNS (a test points api.openai.com at its fake provider on the host).
        self.extra_hosts = dict(extra_hosts or {})
        # Tests sharing a control plane with other tests run only their own namespaces' pods.
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.network = PodNetwork(self.kubelet_id, self.state_dir)
        self.node = NodeInfo(name=node_name, host_ip="")
        self._api = config.new_client_from_config(config_file=str(kubeconfig))
        # Any: bodies are plain dicts (the API's own JSON), which the client sends as is.
        self._core: Any = client.CoreV1Api(self._api)
        server = urllib.parse.urlsplit(self._api.configuration.host)
        self._apiserver: Backend = (server.hostname or "127.0.0.1", server.port or 443)
        self._snapshot = _Snapshot(self)
        self._services: list[Json] = []
        self._endpoints: dict[tuple[str, str], Json] = {}
        self._workers: dict[str, PodWorker] = {}
        self._stopping_uids: set[str] = set()
        self._stoppers: set[asyncio.Task[None]] = set()
        self._finalised: set[str] = set()
        self._written: dict[str, Json] = {}
        self._transitions: dict[tuple[str, str], tuple[str, str]] = {}
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="process-kubelet"
        )
        self._wake: asyncio.Event | None = None
        self._main: concurrent.futures.Future[None] | None = None
        self._closing = threading.Event()
        self._watch: watch.Watch | None = None
        self._proxy = ServiceProxy(self.network.add_service_ip, self.network.remove_service_ip)
        self.pod_start_latencies: list[float] = []
        """Seconds from the kubelet first seeing a pod (unbound) to the status write that
        reported it Running: binding, sandbox, volumes, process start (not readiness)."""
        self._first_seen: dict[str, float] = {}
        self._started_reported: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ProcessKubelet:
        _check_host()
        remove_stale()
        self.network.setup()
        self.node = NodeInfo(name=self.node_name, host_ip=self.network.gateway_ip)
        self._register_node()
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        threading.Thread(target=self._watch_pods, daemon=True, name="kubelet-watch").start()
        log.info(
            "process kubelet %s up (node %s, state %s)",
            self.kubelet_id,
            self.node_name,
            self.state_dir,
        )
        return self

    def stop(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        if self._watch is not None:
            # Closes the open watch, so the API server is not kept waiting at its shutdown.
            with contextlib.suppress(Exception):
                self._watch.stop()
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.network.teardown()
        self._api.close()

    async def _shutdown(self) -> None:
        workers = list(self._workers.values())
        await asyncio.gather(*(w.stop(1.0) for w in workers), return_exceptions=True)
        await self._proxy.close()
        # Connections still being forwarded, status writers: end them before the loop stops.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- public helpers ------------------------------------------------------------------

    @property
    def host_ip(self) -> str:
        """The bridge's address on the host: pods reach host processes listening here."""
        return self.network.gateway_ip

    def pod_dir(self, namespace: str, name: str) -> Path | None:
        matches = sorted((self.state_dir / "pods").glob(f"{namespace}_{name}_*"))
        return matches[-1] if matches else None

    def logs(self, namespace: str, name: str, container: str) -> str:
        directory = self.pod_dir(namespace, name)
        if directory is None or not (directory / f"{container}.log").exists():
            return ""
        return (directory / f"{container}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        """Every container log, for a failing test's output."""
        parts = []
        for path in sorted((self.state_dir / "pods").glob("*/*.log")):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    # -- API calls (blocking; run in the thread pool) ------------------------------------

    def _register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        try:
            self._core.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
        stamp = now()
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "process kubelet is posting ready status",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": self.node.host_ip},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "capacity": {
                    "cpu": str(self.node.cpu),
                    "memory": str(self.node.memory_bytes),
                    "pods": "250",
                },
                "allocatable": {
                    "cpu": str(self.node.cpu),
                    "memory": str(self.node.memory_bytes),
                    "pods": "250",
                },
                "nodeInfo": {
                    "kubeletVersion": "v1.34.4-process",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "process://1",
                    "kernelVersion": "",
                    "osImage": "",
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self._core.patch_node_status(self.node_name, status)

    def request_token(self, pod: Json, audience: str | None, seconds: int) -> tuple[str, float]:
        meta = pod["metadata"]
        spec: Json = {
            "expirationSeconds": seconds,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        account = pod["spec"].get("serviceAccountName") or "default"
        response = self._core.create_namespaced_service_account_token(
            account, meta["namespace"], {"spec": spec}, _preload_content=False
        )
        status = json.loads(response.data)["status"]
        return status["token"], _parse_time(status["expirationTimestamp"])

    def _list(self, method: Any) -> list[Json]:
        response = method(_preload_content=False)
        items: list[Json] = json.loads(response.data)["items"]
        return items

    def _watch_pods(self) -> None:
        # Only a doorbell: every event makes the loop re-list and reconcile.
        while not self._closing.is_set():
            try:
                self._watch = watch.Watch()
                stream = self._watch.stream(
                    self._core.list_pod_for_all_namespaces,
                    timeout_seconds=30,
                    _preload_content=False,
                )
                for _ in stream:
                    if self._closing.is_set():
                        return
                    self._loop.call_soon_threadsafe(self.changed)
            except Exception:  # a dropped watch is re-opened; the sync loop covers the gap
                if self._closing.wait(1.0):
                    return

    # -- the sync loop -------------------------------------------------------------------

    def changed(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def sources(self) -> Sources:
        return self._snapshot

    def services(self) -> list[Json]:
        return self._services

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        last_full = 0.0
        while True:
            full = time.monotonic() - last_full >= self.sync_period
            # Cleared before the pass: a change signalled during it triggers the next one.
            self._wake.clear()
            try:
                await self._sync(full)
                if full:
                    last_full = time.monotonic()
            except Exception:
                log.exception("process kubelet sync failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sync_period)

    async def _sync(self, full: bool) -> None:
        pods = await asyncio.to_thread(self._list, self._core.list_pod_for_all_namespaces)
        if full or not self._services:
            await self._refresh_objects()
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        for pod in pods:
            await self._sync_pod(pod)
        for uid in [u for u in self._workers if u not in by_uid]:
            await self._stop_worker(uid, None)  # force-deleted: nothing left to finalise
        await self._proxy.update(self._desired_services(pods))
        for uid, worker in list(self._workers.items()):
            if (
                full
                and worker.prepared
                and uid not in self._stopping_uids
                and not worker.done.is_set()
            ):
                try:
                    worker.refresh_hosts()
                    await asyncio.to_thread(worker.refresh_volumes)
                except Exception as error:  # one pod's missing object must not stop the rest
                    log.info("refreshing %s: %s", worker.key, error)
            if uid in by_uid:
                await self._write_status(worker)

    async def _refresh_objects(self) -> None:
        services, endpoints, secret_items, cm_items = await asyncio.gather(
            asyncio.to_thread(self._list, self._core.list_service_for_all_namespaces),
            asyncio.to_thread(self._list, self._core.list_endpoints_for_all_namespaces),
            asyncio.to_thread(self._list, self._core.list_secret_for_all_namespaces),
            asyncio.to_thread(self._list, self._core.list_config_map_for_all_namespaces),
        )
        self._services = services
        self._endpoints = {_key(e): e for e in endpoints}
        self._snapshot.secrets = {
            _key(s): {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
            for s in secret_items
        }
        self._snapshot.config_maps = {
            _key(c): {
                **{k: v.encode() for k, v in (c.get("data") or {}).items()},
                **{k: base64.b64decode(v) for k, v in (c.get("binaryData") or {}).items()},
            }
            for c in cm_items
        }

    async def _sync_pod(self, pod: Json) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if self.namespaces is not None and meta["namespace"] not in self.namespaces:
            return
        self._first_seen.setdefault(uid, time.monotonic())
        if not spec.get("nodeName"):
            if not spec.get("schedulingGates"):
                await asyncio.to_thread(self._bind, pod)
            return
        if spec["nodeName"] != self.node_name:
            return
        worker = self._workers.get(uid)
        if meta.get("deletionTimestamp"):
            if uid not in self._stopping_uids:
                self._stopping_uids.add(uid)
                task = asyncio.create_task(self._stop_worker(uid, pod))
                self._stoppers.add(task)
                task.add_done_callback(self._stoppers.discard)
            return
        terminal = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if worker is None and not terminal and uid not in self._finalised:
            worker = PodWorker(self, pod)
            self._workers[uid] = worker
            worker.start()
        elif worker is not None:
            worker.update_pod(pod)

    def _bind(self, pod: Json) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self._core.create_namespaced_pod_binding(
                meta["name"], meta["namespace"], body, _preload_content=False
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    async def _stop_worker(self, uid: str, pod: Json | None) -> None:
        worker = self._workers.get(uid)
        if worker is not None:
            grace = self.max_grace_seconds
            if pod is not None:
                asked = pod["metadata"].get("deletionGracePeriodSeconds")
                grace = min(grace, float(asked)) if asked is not None else grace
            await worker.stop(grace)
            if pod is not None:
                await self._write_status(worker, final=True)
        if pod is not None:
            await asyncio.to_thread(self._finalise, pod)
        self._finalised.add(uid)
        self._workers.pop(uid, None)
        self._stopping_uids.discard(uid)
        self._snapshot.forget(uid)
        if worker is not None:
            worker.forget()

    def _finalise(self, pod: Json) -> None:
        # What the kubelet does once the containers are gone: delete with grace 0.
        meta = pod["metadata"]
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        with contextlib.suppress(ApiException):
            self._core.delete_namespaced_pod(meta["name"], meta["namespace"], body=options)

    async def _write_status(self, worker: PodWorker, *, final: bool = False) -> None:
        status = worker.status()
        if final and status["phase"] not in ("Succeeded", "Failed"):
            status["phase"] = (
                "Failed" if worker.pod["spec"].get("restartPolicy") != "Always" else status["phase"]
            )
        uid = worker.pod["metadata"]["uid"]
        if self._written.get(uid) == status:
            return
        stamped = self._stamp(uid, status)
        meta = worker.pod["metadata"]
        try:
            await asyncio.to_thread(
                self._core.patch_namespaced_pod_status,
                meta["name"],
                meta["namespace"],
                {"status": stamped},
            )
        except ApiException as error:
            if error.status != 404:
                log.warning("status of %s: %s", worker.key, error.reason)
            return
        self._written[uid] = status
        if status["phase"] == "Running" and uid not in self._started_reported:
            self._started_reported.add(uid)
            seen = self._first_seen.get(uid)
            if seen is not None:
                self.pod_start_latencies.append(time.monotonic() - seen)
        if worker.done.is_set() and status["phase"] in ("Succeeded", "Failed"):
            worker.teardown()

    def _stamp(self, uid: str, status: Json) -> Json:
        """Add lastTransitionTime to conditions, kept while a condition's status holds."""
        stamped = dict(status)
        conditions = []
        for condition in status["conditions"]:
            key = (uid, condition["type"])
            previous = self._transitions.get(key)
            if previous is None or previous[0] != condition["status"]:
                previous = (condition["status"], now())
                self._transitions[key] = previous
            conditions.append({**condition, "lastTransitionTime": previous[1]})
        stamped["conditions"] = conditions
        return stamped

    # -- services ------------------------------------------------------------------------

    def _desired_services(self, pods: list[Json]) -> dict[Backend, list[Backend]]:
        desired: dict[Backend, list[Backend]] = {}
        ready = [p for p in pods if _is_ready(p)]
        for service in self._services:
            spec = service.get("spec") or {}
            ip = spec.get("clusterIP")
            if not ip or ip == "None":
                continue
            for port in spec.get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                desired[(ip, int(port["port"]))] = self._backends(service, port, ready)
        return desired

    def _backends(self, service: Json, port: Json, ready: list[Json]) -> list[Backend]:
        selector = (service.get("spec") or {}).get("selector") or {}
        namespace = service["metadata"]["namespace"]
        if not selector:
            found = _endpoint_backends(self._endpoints.get(_key(service)), port)
            if not found and _key(service) == ("default", "kubernetes"):
                # An API server advertising 127.0.0.1 publishes no endpoints for itself.
                return [self._apiserver]
            return found
        backends = []
        target: int | str = port.get("targetPort") or port["port"]
        for pod in ready:
            meta = pod["metadata"]
            if meta["namespace"] != namespace or not selector_matches(
                selector, meta.get("labels") or {}
            ):
                continue
            number = container_port(pod, target)
            if number is not None:
                backends.append((pod["status"]["podIP"], number))
        return backends


def _check_host() -> None:
    missing = [tool for tool in ("ip", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"the process kubelet needs {missing} (make install adds iproute2 "
            "and util-linux on Debian)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("the process kubelet needs root (network and mount namespaces)")


def _parse_time(stamp: str) -> float:
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def _key(obj: Json) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _is_ready(pod: Json) -> bool:
    status = pod.get("status") or {}
    if not status.get("podIP") or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
    )


def _endpoint_backends(endpoints: Json | None, port: Json) -> list[Backend]:
    """A selector-less Service (e.g. ``kubernetes``): the Endpoints object's addresses."""
    if endpoints is None:
        return []
    backends = []
    for subset in endpoints.get("subsets") or []:
        ports = subset.get("ports") or []
        match = next((p for p in ports if p.get("name") == port.get("name")), None)
        if match is None and len(ports) == 1:
            match = ports[0]
        if match is None:
            continue
        for address in subset.get("addresses") or []:
            backends.append((address["ip"], int(match["port"])))
    return backends
