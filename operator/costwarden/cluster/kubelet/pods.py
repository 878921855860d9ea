"""One pod's life on the process kubelet: sandbox, volumes, init containers, native
sidecars, containers with restarts and probes, and the status the API server is told."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from costwarden.cluster.kubelet.atomic import write_atomically
from costwarden.cluster.kubelet.network import PodNetwork
from costwarden.cluster.kubelet.nsexec import (
    Mount,
    Sandbox,
    enter,
    image_paths,
    prepare_targets,
)
from costwarden.cluster.kubelet.podspec import (
    ImageMap,
    Json,
    MissingReferenceError,
    NodeInfo,
    Sources,
    UnsupportedError,
    command_line,
    container_env,
    container_port,
    hosts_file,
    volume_files,
)

IMAGE_PATHS = image_paths()
log = logging.getLogger(__name__)

MAX_BACKOFF = 10.0
"""The real kubelet backs off up to 5 minutes; tests need restarts within seconds."""
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodHost(Protocol):
    """What a pod needs from its kubelet."""

    node: NodeInfo
    images: ImageMap
    network: PodNetwork
    state_dir: Path
    extra_hosts: dict[str, str]

    def sources(self) -> Sources: ...

    def services(self) -> list[Json]: ...

    def changed(self) -> None: ...


@dataclass
class Container:
    spec: Json
    init: bool = False
    sidecar: bool = False
    process: asyncio.subprocess.Process | None = None
    state: Json = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Json = field(default_factory=dict)
    restarts: int = 0
    ready: bool = False
    started: bool = False
    stopped: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return None if terminated is None else int(terminated["exitCode"])

    def status(self, image: str) -> Json:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": image,
            "imageID": f"local://{image}",
            "containerID": f"process://{self.process.pid}" if self.process else "",
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": self.restarts,
            "started": self.started and running,
        }


class PodWorker:
    """Runs one pod until it ends or is stopped."""

    def __init__(self, host: PodHost, pod: Json) -> None:
        self.host = host
        self.pod = pod
        meta = pod["metadata"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.dir = host.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        spec = pod["spec"]
        self.init = [
            Container(c, init=True, sidecar=c.get("restartPolicy") == "Always")
            for c in spec.get("initContainers") or []
        ]
        self.main = [Container(c) for c in spec["containers"]]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.netns: str | None = None
        self.pod_ip = ""
        self.phase = "Pending"
        self.initialized = False
        self.start_time = now()
        self.stopping = False
        self.prepared = False
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._message = ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod {self.key}")

    async def _run(self) -> None:
        try:
            await self._prepare()
            if await self._run_init():
                await self._run_main()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a kubelet bug must show on the pod, not vanish
            log.exception("pod %s failed", self.key)
            self._message = f"process kubelet: {error}"
            self.phase = "Failed"
        finally:
            self.done.set()
            self.host.changed()

    async def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.pod["spec"].get("hostNetwork"):
            self.pod_ip = self.host.network.gateway_ip
        else:
            self.netns, self.pod_ip = await asyncio.to_thread(self.host.network.create_sandbox)
        self.pod.setdefault("status", {})["podIP"] = self.pod_ip
        self.refresh_hosts()
        self.prepared = True
        while not self.stopping:
            try:
                await asyncio.to_thread(self.refresh_volumes)
                return
            except MissingReferenceError as error:
                self._waiting_all("ContainerCreating", str(error))
                await asyncio.sleep(1.0)  # the referenced object may appear; retry

    async def _run_init(self) -> bool:
        for container in self.init:
            if container.sidecar:
                container.task = asyncio.create_task(self._supervise(container))
                while not (container.started or self.stopping or container.task.done()):
                    await asyncio.sleep(0.05)  # until its startup probe passed
                continue
            backoff = 1.0
            while not self.stopping:
                await self._run_once(container)
                if container.exit_code == 0:
                    break
                if self.restart_policy == "Never":
                    self.phase = "Failed"
                    return False
                container.restarts += 1
                await self._backoff(container, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self.initialized = True
        self.host.changed()
        return not self.stopping

    async def _run_main(self) -> None:
        for container in self.main:
            container.task = asyncio.create_task(self._supervise(container))
        await asyncio.gather(*(c.task for c in self.main if c.task))
        if self.stopping:
            return
        failed = any(c.exit_code != 0 for c in self.main)
        self.phase = "Failed" if failed else "Succeeded"
        await self._stop_sidecars(grace=5.0)

    async def stop(self, grace: float) -> None:
        """SIGTERM the containers (sidecars last), SIGKILL what is left after ``grace``."""
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + grace
        await _terminate([c for c in self.main if c.process], deadline)
        await self._stop_sidecars(max(0.0, deadline - asyncio.get_running_loop().time()))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for container in self.init + self.main:
            if container.task is not None:
                container.task.cancel()
        self.teardown()

    async def _stop_sidecars(self, grace: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace
        sidecars = [c for c in reversed(self.init) if c.sidecar]
        for container in sidecars:
            container.stopped = True  # no restart while the pod winds down
        await _terminate([c for c in sidecars if c.process], deadline)
        for container in sidecars:
            if container.task is not None:
                container.task.cancel()

    def teardown(self) -> None:
        """Remove the network sandbox (logs and volumes stay for debugging until
        :meth:`forget`)."""
        if self.netns is not None:
            self.host.network.delete_sandbox(self.netns)
            self.netns = None

    def forget(self) -> None:
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    # -- one container -----------------------------------------------------------------

    async def _supervise(self, container: Container) -> None:
        backoff = 1.0
        while not self.stopping:
            started = await self._run_once(container)
            if self.stopping or container.stopped:
                return
            if started and not self._restarts(container):
                return
            container.restarts += 1 if started else 0
            await self._backoff(container, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _restarts(self, container: Container) -> bool:
        if container.sidecar or self.restart_policy == "Always":
            return True
        return self.restart_policy == "OnFailure" and container.exit_code != 0

    async def _backoff(self, container: Container, seconds: float) -> None:
        if container.exit_code is not None:
            container.last_state = {"terminated": container.state["terminated"]}
        container.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {seconds:.0f}s restarting",
            }
        }
        self.host.changed()
        await asyncio.sleep(seconds)

    async def _run_once(self, container: Container) -> bool:
        """Run the container's process until it exits; False if it could not start."""
        try:
            argv, env, sandbox = await asyncio.to_thread(self._container_config, container)
        except (MissingReferenceError, UnsupportedError) as error:
            container.state = {
                "waiting": {"reason": "CreateContainerConfigError", "message": str(error)}
            }
            self.host.changed()
            return False
        log_path = self.log_path(container.name)
        with log_path.open("ab") as log_file:
            log_file.write(f"--- {now()} start: {argv}\n".encode())
            log_file.flush()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=enter(sandbox),
                )
            except OSError as error:
                container.state = {
                    "waiting": {"reason": "RunContainerError", "message": str(error)}
                }
                self.host.changed()
                return False
        container.process = process
        container.state = {"running": {"startedAt": now()}}
        container.ready = False
        container.started = not container.spec.get("startupProbe")
        self.host.changed()
        probes = self._start_probes(container)
        code = await process.wait()
        for probe in probes:
            probe.cancel()
        self._terminated(container, code)
        return True

    def _terminated(self, container: Container, code: int) -> None:
        exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
        reason = "Completed" if exit_code == 0 else "Error"
        running = container.state.get("running", {})
        container.state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": running.get("startedAt"),
                "finishedAt": now(),
                "containerID": f"process://{container.process.pid}" if container.process else "",
            }
        }
        container.ready = False
        container.started = False
        self.host.changed()

    def _container_config(self, container: Container) -> tuple[list[str], dict[str, str], Sandbox]:
        spec = container.spec
        image = self.host.images.resolve(spec["image"])
        env = container_env(
            self.pod,
            spec,
            self.host.sources(),
            self.host.node,
            services=self.host.services(),
            base=image.env,
        )
        argv = command_line(spec, image, env)
        sandbox = Sandbox(
            netns=self.netns,
            hostname=self.pod["spec"].get("hostname") or self.pod["metadata"]["name"],
            mounts=tuple(self._mounts(spec)),
            workdir=spec.get("workingDir") or image.workdir,
            read_only_root=bool((spec.get("securityContext") or {}).get("readOnlyRootFilesystem")),
            image_paths=IMAGE_PATHS,
        )
        prepare_targets(sandbox)
        return argv, env, sandbox

    def _mounts(self, spec: Json) -> list[Mount]:
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = [
            Mount(str(self.dir / "etc-hosts"), "/etc/hosts", read_only=True),
            Mount(str(self.dir / "resolv.conf"), "/etc/resolv.conf", read_only=True),
        ]
        for wanted in spec.get("volumeMounts") or []:
            if wanted["name"] not in volumes:
                raise UnsupportedError(f"volumeMount {wanted['name']!r} names no volume")
            source = self.volume_dir(wanted["name"])
            if wanted.get("subPath"):
                source = source / wanted["subPath"]
            mounts.append(
                Mount(str(source), wanted["mountPath"], read_only=bool(wanted.get("readOnly")))
            )
        return mounts

    # -- probes ------------------------------------------------------------------------

    def _start_probes(self, container: Container) -> list[asyncio.Task[None]]:
        spec = container.spec
        tasks = []
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if spec.get(kind):
                tasks.append(asyncio.create_task(self._probe_loop(container, kind, spec[kind])))
        if not spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self._ready_when_started(container)))
        return tasks

    async def _ready_when_started(self, container: Container) -> None:
        while not container.started:
            await asyncio.sleep(0.1)
        container.ready = True
        self.host.changed()

    async def _probe_loop(self, container: Container, kind: str, probe: Json) -> None:
        if kind != "startupProbe":
            while not container.started:
                await asyncio.sleep(0.1)  # readiness and liveness wait for startup
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        period = probe.get("periodSeconds", 10)
        # Readiness is checked quickly at first: waiting a full period to report the first
        # success only slows tests down, and a real kubelet probes right after start too.
        successes = failures = 0
        while True:
            ok = await self._probe_once(container, probe)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if self._probe_verdict(container, kind, probe, successes, failures):
                return
            first_pass = kind != "livenessProbe" and not ok and successes == 0
            await asyncio.sleep(min(period, 0.5) if first_pass else period)

    def _probe_verdict(
        self, container: Container, kind: str, probe: Json, successes: int, failures: int
    ) -> bool:
        """Apply a result; True when the loop should end."""
        needed_ok = probe.get("successThreshold", 1)
        needed_fail = probe.get("failureThreshold", 3)
        if kind == "startupProbe":
            if successes >= 1:
                container.started = True
                self.host.changed()
                return True
            if failures >= needed_fail and container.process:
                log.info("%s/%s failed its startup probe", self.key, container.name)
                _signal(container.process, signal.SIGKILL)
                return True
        elif kind == "readinessProbe":
            ready = successes >= needed_ok or (container.ready and failures < needed_fail)
            if ready != container.ready:
                container.ready = ready
                self.host.changed()
        elif failures >= needed_fail and container.process:
            log.info("%s/%s failed its liveness probe; restarting", self.key, container.name)
            _signal(container.process, signal.SIGTERM)
            return True
        return False

    async def _probe_once(self, container: Container, probe: Json) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            return await asyncio.wait_for(self._check(container, probe), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return False

    async def _check(self, container: Container, probe: Json) -> bool:
        if "httpGet" in probe:
            get = probe["httpGet"]
            return await _http_ok(
                get.get("host") or self.pod_ip,
                container_port(self.pod, get["port"]),
                get.get("path", "/"),
                get.get("scheme", "HTTP") == "HTTPS",
            )
        if "tcpSocket" in probe:
            port = container_port(self.pod, probe["tcpSocket"]["port"])
            _, writer = await asyncio.open_connection(self.pod_ip, port)
            writer.close()
            return True
        if "exec" in probe and container.process is not None:
            pid = str(container.process.pid)
            checker = await asyncio.create_subprocess_exec(
                "nsenter",
                "-t",
                pid,
                "-n",
                "-m",
                "-u",
                "--",
                *probe["exec"]["command"],
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await checker.wait() == 0
        log.warning("%s/%s: unsupported probe %s", self.key, container.name, sorted(probe))
        return False

    # -- volumes and files -------------------------------------------------------------

    def volume_dir(self, name: str) -> Path:
        return self.dir / "volumes" / name

    def log_path(self, container: str) -> Path:
        return self.dir / f"{container}.log"

    def refresh_volumes(self) -> None:
        """(Re)write every volume from the current objects; atomic per volume."""
        sources = self.host.sources()
        for volume in self.pod["spec"].get("volumes") or []:
            files = volume_files(self.pod, volume, sources, self.host.node)
            directory = self.volume_dir(volume["name"])
            if files is None:
                directory.mkdir(parents=True, exist_ok=True)
            elif write_atomically(directory, files):
                log.debug("%s: volume %s updated", self.key, volume["name"])

    def refresh_hosts(self) -> None:
        text = hosts_file(self.pod, self.pod_ip, self.host.services(), self.host.extra_hosts)
        hosts = self.dir / "etc-hosts"
        # Rewritten in place: the file is bind-mounted, a rename would leave the old inode.
        if not hosts.exists() or hosts.read_text() != text:
            with hosts.open("a+") as file:
                file.seek(0)
                file.truncate()
                file.write(text)
        resolv = self.dir / "resolv.conf"
        if not resolv.exists():
            # No cluster DNS: names outside /etc/hosts fail fast instead of timing out.
            resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def update_pod(self, pod: Json) -> None:
        """Take the API server's newer copy (labels, annotations for the downward API)."""
        pod.setdefault("status", {})["podIP"] = self.pod_ip
        self.pod = pod

    def _waiting_all(self, reason: str, message: str) -> None:
        for container in self.init + self.main:
            if container.process is None:
                container.state = {"waiting": {"reason": reason, "message": message}}
        self.host.changed()

    # -- status ------------------------------------------------------------------------

    def status(self) -> Json:
        phase = self.phase
        if (
            phase == "Pending"
            and self.initialized
            and any(c.process is not None for c in self.main)
        ):
            phase = "Running"
        sidecars = [c for c in self.init if c.sidecar]
        ready_set = self.main + sidecars
        containers_ready = phase == "Running" and all(c.ready for c in ready_set)
        initialized = self.initialized or phase in ("Succeeded", "Failed")
        status: Json = {
            "phase": phase,
            "hostIP": self.host.node.host_ip,
            "hostIPs": [{"ip": self.host.node.host_ip}],
            "startTime": self.start_time,
            "conditions": [
                _condition("PodScheduled", True),
                _condition("Initialized", initialized),
                _condition("ContainersReady", containers_ready),
                _condition("Ready", containers_ready),
            ],
            "containerStatuses": [c.status(c.spec["image"]) for c in self.main],
        }
        if self.pod_ip:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if self.init:
            status["initContainerStatuses"] = [c.status(c.spec["image"]) for c in self.init]
        if self._message:
            status["message"] = self._message
        return status


def _condition(kind: str, ok: bool) -> Json:
    # lastTransitionTime is filled by the kubelet main loop, which remembers transitions.
    return {"type": kind, "status": "True" if ok else "False"}


def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _terminate(containers: list[Container], deadline: float) -> None:
    running = [c.process for c in containers if c.process and c.process.returncode is None]
    for process in running:
        _signal(process, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    for process in running:
        try:
            await asyncio.wait_for(process.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            log.warning("pid %d ignored SIGTERM; killing it", process.pid)
        # The whole process group: a container's own children must not outlive it.
        _signal(process, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await process.wait()


async def _http_ok(host: str, port: int | None, path: str, tls: bool) -> bool:
    if port is None:
        raise ValueError("probe port not found")
    context: Any = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            "User-Agent: kube-probe/1.34\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
        code = int(line.split()[1])
        return 200 <= code < 400
    finally:
        writer.close()
