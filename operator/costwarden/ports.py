"""Free TCP ports on 127.0.0.1 for the processes tests, benchmarks and the demo start.

Why not just bind port 0: the kernel then hands out a port from the *ephemeral* range,
the same range it uses for the source port of every outgoing connection. Between probing
a port and the child binding it, any of the thousands of connections a test or benchmark
opens may take it ("address already in use"). Ports below the ephemeral range are never
chosen for outgoing connections, so only another listener can collide, and we probe for
that.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on, outside the ephemeral range."""
    highest = _ephemeral_start() - 1
    if highest - _LOWEST < count * 10:
        return _kernel_ports(count)  # an unusual range: fall back to the kernel's choice
    chosen: list[int] = []
    rng = random.SystemRandom()
    while len(chosen) < count:
        port = rng.randint(_LOWEST, highest)
        if port not in chosen and _is_free(port):
            chosen.append(port)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
