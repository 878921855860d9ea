"""Pod networking: one Linux bridge per kubelet, one network namespace per pod, a veth
pair between them, pod IPs from a private /24. Service ClusterIPs are added to the bridge
as /32 addresses so the service proxy can listen on them and pods route to them.

Names carry a short per-kubelet id so parallel test sessions never collide; an owner file
under the state directory lets a later kubelet remove what a crashed one left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
STATE_ROOT = Path("/run/costwarden-kubelet")
OWNER_FILE = "owner.json"
_POD_SUPERNET = ipaddress.IPv4Network("10.128.0.0/10")


class NetworkError(RuntimeError):
    """An `ip` command failed."""


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address or route in (to pick a free /24)."""
    networks = []
    for line in ip("-o", "-4", "addr", "show").splitlines():
        networks.append(ipaddress.IPv4Interface(line.split()[3]).network)
    for line in ip("-4", "route", "show").splitlines():
        first = line.split()[0]
        if first[0].isdigit():
            networks.append(ipaddress.IPv4Network(first, strict=False))
    return networks


def free_subnet(supernet: ipaddress.IPv4Network = _POD_SUPERNET) -> ipaddress.IPv4Network:
    """A random /24 of ``supernet`` that overlaps nothing on the host."""
    used = used_networks()
    subnets = list(supernet.subnets(new_prefix=24))
    for _ in range(200):
        candidate = random.choice(subnets)  # noqa: S311  (not security relevant)
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetworkError(f"no free /24 in {supernet}")


class PodNetwork:
    """The bridge and the pods' sandboxes of one kubelet."""

    def __init__(self, kubelet_id: str, state_dir: Path) -> None:
        self.kubelet_id = kubelet_id
        self.bridge = f"cwk{kubelet_id}"
        self.state_dir = state_dir
        self.subnet: ipaddress.IPv4Network | None = None
        self._free: list[str] = []
        self._service_ips: set[str] = set()
        self._sandboxes: dict[str, str] = {}  # netns name -> pod IP
        self._counter = 0

    @property
    def gateway_ip(self) -> str:
        assert self.subnet is not None
        return str(next(self.subnet.hosts()))

    def setup(self) -> None:
        self.subnet = free_subnet()
        hosts = [str(h) for h in self.subnet.hosts()]
        self._free = hosts[1:]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / OWNER_FILE).write_text(
            json.dumps({"pid": os.getpid(), "bridge": self.bridge, "prefix": self._prefix()})
        )
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        log.info("pod network %s on bridge %s", self.subnet, self.bridge)

    def _prefix(self) -> str:
        return f"cwk-{self.kubelet_id}-"

    def create_sandbox(self) -> tuple[str, str]:
        """A new network namespace wired to the bridge; returns (netns name, pod IP)."""
        if not self._free:
            raise NetworkError(f"pod network {self.subnet} is full")
        self._counter += 1
        netns = f"{self._prefix()}{self._counter}"
        host_if = f"cv{self.kubelet_id}{self._counter}"[:15]
        pod_ip = self._free.pop(0)
        ip("netns", "add", netns)
        self._sandboxes[netns] = pod_ip
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("link", "set", host_if, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", "default", "via", self.gateway_ip)
        return netns, pod_ip

    def delete_sandbox(self, netns: str) -> None:
        # Deleting the namespace destroys eth0 and with it the host end of the veth pair.
        ip("netns", "delete", netns, check=False)
        pod_ip = self._sandboxes.pop(netns, None)
        if pod_ip is not None:
            self._free.append(pod_ip)

    def add_service_ip(self, address: str) -> None:
        if address not in self._service_ips:
            ip("addr", "add", f"{address}/32", "dev", self.bridge)
            self._service_ips.add(address)

    def remove_service_ip(self, address: str) -> None:
        if address in self._service_ips:
            ip("addr", "del", f"{address}/32", "dev", self.bridge, check=False)
            self._service_ips.discard(address)

    def teardown(self) -> None:
        for netns in list(self._sandboxes):
            self.delete_sandbox(netns)
        ip("link", "delete", self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / OWNER_FILE).unlink()


def remove_stale(state_root: Path = STATE_ROOT) -> None:
    """Remove the bridges and namespaces of kubelets whose process is gone (a crash)."""
    if not state_root.is_dir():
        return
    for owner in state_root.glob(f"*/{OWNER_FILE}"):
        try:
            record = json.loads(owner.read_text())
            os.kill(int(record["pid"]), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            continue
        log.warning("removing the network of a dead kubelet (%s)", owner.parent)
        for line in ip("netns", "list", check=False).splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(record["prefix"]):
                ip("netns", "delete", name, check=False)
        ip("link", "delete", record["bridge"], check=False)
        shutil.rmtree(owner.parent, ignore_errors=True)
