"""Pure decisions of the process kubelet: what a container's environment, command line and
volume files are, given a Pod (as the API server's JSON) and the objects it references.

No I/O here: the objects a pod refers to come through :class:`Sources`, so the same
functions serve the kubelet and its unit tests.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.utils.quantity import parse_quantity

Json = dict[str, Any]
Files = dict[str, tuple[bytes, int]]
"""Relative path -> (content, mode) of one volume's files."""

DEFAULT_FILE_MODE = 0o644
CLUSTER_DOMAIN = "cluster.local"


class MissingReferenceError(Exception):
    """A Secret, ConfigMap or key a pod needs (not marked optional) does not exist yet."""


class UnsupportedError(Exception):
    """The pod asks for something the process kubelet does not implement."""


class Sources(Protocol):
    """The objects a pod's env and volumes refer to, from the kubelet's current view."""

    def secret(self, namespace: str, name: str) -> Mapping[str, bytes] | None: ...

    def config_map(self, namespace: str, name: str) -> Mapping[str, bytes] | None: ...

    def token(self, pod: Json, audience: str | None, expiration_seconds: int) -> str: ...


@dataclass(frozen=True)
class NodeInfo:
    """What fieldRef / resourceFieldRef can read about the node and the pod's sandbox."""

    name: str
    host_ip: str
    cpu: int = os.cpu_count() or 1
    memory_bytes: int = 8 << 30


# -- image -> local command ------------------------------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """How an image runs here: its ENTRYPOINT, CMD, WORKDIR and ENV, as local paths."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/"
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageMap:
    """Image reference glob -> :class:`LocalImage`; the first match wins."""

    entries: tuple[tuple[str, LocalImage], ...]

    def resolve(self, image: str) -> LocalImage:
        for pattern, local in self.entries:
            if fnmatch.fnmatchcase(image, pattern):
                return local
        raise UnsupportedError(f"no local mapping for image {image!r}")


def command_line(container: Json, image: LocalImage, env: Mapping[str, str]) -> list[str]:
    """The kubelet's rule: ``command`` replaces ENTRYPOINT (and drops CMD), ``args``
    replaces CMD; ``$(VAR)`` in both expands from the container's environment."""
    command = container.get("command")
    args = container.get("args")
    entry = [expand(c, env) for c in command] if command else list(image.entrypoint)
    if args is not None:
        rest = [expand(a, env) for a in args]
    else:
        rest = [] if command else list(image.cmd)
    argv = entry + rest
    if not argv:
        raise UnsupportedError(f"container {container['name']!r} has no command")
    return argv


# -- $(VAR) expansion and environment --------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion: ``$(VAR)`` becomes VAR's value when defined and stays as
    written otherwise; ``$$`` escapes a ``$``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _REFERENCE.sub(replace, text)


def service_env(services: Iterable[Json], namespace: str) -> dict[str, str]:
    """``<SVC>_SERVICE_HOST`` / ``_SERVICE_PORT[_<NAME>]`` for the pod's namespace's
    Services plus the master ``kubernetes`` Service, as the kubelet sets them."""
    env: dict[str, str] = {}
    for service in services:
        meta, spec = service["metadata"], service.get("spec", {})
        own = meta["namespace"] == namespace
        master = meta["namespace"] == "default" and meta["name"] == "kubernetes"
        ip = spec.get("clusterIP")
        if not (own or master) or not ip or ip == "None":
            continue
        prefix = meta["name"].upper().replace("-", "_")
        ports = spec.get("ports") or []
        env[f"{prefix}_SERVICE_HOST"] = ip
        if ports:
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(
                    port["port"]
                )
    return env


def container_env(
    pod: Json,
    container: Json,
    sources: Sources,
    node: NodeInfo,
    *,
    services: Iterable[Json] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment in the kubelet's precedence order: image ENV, service
    links, ``envFrom``, then ``env`` (each ``value`` expanded with what precedes it)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = dict(base or {})
    if pod["spec"].get("enableServiceLinks", True):
        env.update(service_env(services, namespace))
    else:
        env.update(
            {
                k: v
                for k, v in service_env(services, namespace).items()
                if k.startswith("KUBERNETES_")
            }
        )
    for source in container.get("envFrom") or []:
        env.update(_env_from(namespace, source, sources))
    for var in container.get("env") or []:
        value = _env_value(pod, container, var, sources, node, env)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_from(namespace: str, source: Json, sources: Sources) -> dict[str, str]:
    prefix = source.get("prefix", "")
    if "secretRef" in source:
        ref, data = source["secretRef"], sources.secret(namespace, source["secretRef"]["name"])
    else:
        ref = source["configMapRef"]
        data = sources.config_map(namespace, ref["name"])
    if data is None:
        if ref.get("optional"):
            return {}
        raise MissingReferenceError(f"envFrom {ref['name']!r} not found")
    return {prefix + k: v.decode() for k, v in data.items()}


def _env_value(
    pod: Json, container: Json, var: Json, sources: Sources, node: NodeInfo, env: dict[str, str]
) -> str | None:
    if "valueFrom" not in var:
        return expand(var.get("value", ""), env)
    source = var["valueFrom"]
    namespace = pod["metadata"]["namespace"]
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"], node)
    if "resourceFieldRef" in source:
        return resource_value(pod, container, source["resourceFieldRef"], node)
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        data = sources.secret(namespace, ref["name"])
        kind = "Secret"
    elif "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        data = sources.config_map(namespace, ref["name"])
        kind = "ConfigMap"
    else:
        raise UnsupportedError(f"env {var['name']!r}: unsupported valueFrom {sorted(source)}")
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise MissingReferenceError(
            f"env {var['name']!r}: {kind} {namespace}/{ref['name']} key {ref['key']!r} not found"
        )
    return data[ref["key"]].decode()


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Json, path: str, node: NodeInfo) -> str:
    """A ``fieldRef`` as the downward API serves it."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "metadata.labels": lambda: _format_map(meta.get("labels") or {}),
        "metadata.annotations": lambda: _format_map(meta.get("annotations") or {}),
        "spec.nodeName": lambda: spec.get("nodeName") or node.name,
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.podIPs": lambda: ",".join(ip["ip"] for ip in status.get("podIPs") or []),
        "status.hostIP": lambda: node.host_ip,
        "status.hostIPs": lambda: node.host_ip,
    }
    if path in simple:
        return simple[path]()
    match = _SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise UnsupportedError(f"fieldRef {path!r} is not supported")


def _format_map(values: Mapping[str, str]) -> str:
    # The downward API's format: one key="value" per line, sorted, values JSON-quoted.
    import json

    return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))


def resource_value(pod: Json, container: Json | None, ref: Json, node: NodeInfo) -> str:
    """A ``resourceFieldRef``: the container's request/limit, the node's capacity for a
    limit that is not set (as the kubelet does), divided and rounded up."""
    if container is None or ref.get("containerName"):
        wanted = ref.get("containerName")
        container = next(c for c in pod["spec"]["containers"] if c["name"] == wanted)
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None:
        raw = str(node.cpu) if resource == "cpu" else str(node.memory_bytes)
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


# -- volumes ---------------------------------------------------------------------------------


def volume_files(pod: Json, volume: Json, sources: Sources, node: NodeInfo) -> Files | None:
    """The files of a Secret, ConfigMap, downwardAPI or projected volume; None for a
    volume kind that is a plain directory (emptyDir)."""
    namespace = pod["metadata"]["namespace"]
    if "emptyDir" in volume:
        return None
    if "secret" in volume:
        spec = volume["secret"]
        data = sources.secret(namespace, spec["secretName"])
        return _keyed_files(
            f"Secret {namespace}/{spec['secretName']}",
            data,
            spec,
            spec.get("defaultMode", DEFAULT_FILE_MODE),
        )
    if "configMap" in volume:
        spec = volume["configMap"]
        data = sources.config_map(namespace, spec["name"])
        return _keyed_files(
            f"ConfigMap {namespace}/{spec['name']}",
            data,
            spec,
            spec.get("defaultMode", DEFAULT_FILE_MODE),
        )
    if "downwardAPI" in volume:
        spec = volume["downwardAPI"]
        return _downward_files(
            pod, spec.get("items") or [], spec.get("defaultMode", DEFAULT_FILE_MODE), node
        )
    if "projected" in volume:
        return _projected_files(pod, volume["projected"], sources, node)
    kinds = sorted(k for k in volume if k != "name")
    raise UnsupportedError(f"volume {volume['name']!r}: {kinds} volumes are not supported")


def _keyed_files(
    what: str, data: Mapping[str, bytes] | None, spec: Json, default_mode: int
) -> Files:
    if data is None:
        if spec.get("optional"):
            return {}
        raise MissingReferenceError(f"{what} not found")
    items = spec.get("items")
    if items is None:
        return {key: (value, default_mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            if spec.get("optional"):
                continue
            raise MissingReferenceError(f"{what} has no key {item['key']!r}")
        files[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
    return files


def _downward_files(pod: Json, items: list[Json], default_mode: int, node: NodeInfo) -> Files:
    files: Files = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"], node)
        else:
            value = resource_value(pod, None, item["resourceFieldRef"], node)
        files[item["path"]] = (value.encode(), item.get("mode", default_mode))
    return files


def _projected_files(pod: Json, spec: Json, sources: Sources, node: NodeInfo) -> Files:
    namespace = pod["metadata"]["namespace"]
    mode = spec.get("defaultMode", DEFAULT_FILE_MODE)
    files: Files = {}
    for source in spec.get("sources") or []:
        if "secret" in source:
            ref = source["secret"]
            data = sources.secret(namespace, ref["name"])
            files.update(_keyed_files(f"Secret {namespace}/{ref['name']}", data, ref, mode))
        elif "configMap" in source:
            ref = source["configMap"]
            data = sources.config_map(namespace, ref["name"])
            files.update(_keyed_files(f"ConfigMap {namespace}/{ref['name']}", data, ref, mode))
        elif "downwardAPI" in source:
            files.update(_downward_files(pod, source["downwardAPI"].get("items") or [], mode, node))
        elif "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            token = sources.token(pod, ref.get("audience"), ref.get("expirationSeconds", 3600))
            # The kubelet writes tokens 0600 unless a mode is set (they are credentials).
            files[ref["path"]] = (token.encode(), spec.get("defaultMode", 0o600))
        else:
            raise UnsupportedError(f"projected source {sorted(source)} is not supported")
    return files


# -- /etc/hosts ------------------------------------------------------------------------------


def hosts_file(
    pod: Json, pod_ip: str, services: Iterable[Json], extra: Mapping[str, str] | None = None
) -> str:
    """The pod's /etc/hosts: itself, then every Service with a ClusterIP under the names
    cluster DNS would answer (short names only for the pod's own namespace), then ``extra``
    (name -> address: what the cluster's upstream DNS answers, e.g. a test's provider)."""
    meta = pod["metadata"]
    hostname = pod["spec"].get("hostname") or meta["name"]
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{hostname}",
    ]
    for service in sorted(
        services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])
    ):
        ip = service.get("spec", {}).get("clusterIP")
        if not ip or ip == "None":
            continue
        name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
        names = [
            f"{name}.{namespace}",
            f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}",
        ]
        if namespace == meta["namespace"]:
            names.insert(0, name)
        lines.append(f"{ip}\t{' '.join(names)}")
    lines += [f"{address}\t{name}" for name, address in sorted((extra or {}).items())]
    return "\n".join(lines) + "\n"


# -- ports -----------------------------------------------------------------------------------


def container_port(pod: Json, port: int | str) -> int | None:
    """A numeric port, or the number of a named container port of the pod."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for container in _all_containers(pod):
        for declared in container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
    return None


def _all_containers(pod: Json) -> list[Json]:
    spec = pod["spec"]
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's equality selector (an empty one selects nothing, as for Services)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
