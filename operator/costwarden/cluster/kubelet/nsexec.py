"""Entering a pod's sandbox between fork and exec: the pod's network namespace, a fresh
mount namespace with the container's volumes bind-mounted at their mountPaths, and a UTS
namespace carrying the pod's hostname.

``readOnlyRootFilesystem`` is enforced: / becomes a read-only mount in the container's
namespace, and only its volumes (and /proc, /dev, /sys) are writable.

Runs as a ``preexec_fn``, i.e. in the forked child before exec, so it uses raw syscalls
through ctypes and does as little as possible. Volume sources are opened (``O_PATH``)
before any mount and bind-mounted from ``/proc/self/fd/N``: a volume mounted over, say,
``/tmp`` or ``/run`` can then not hide the source of a later one.

The "image" is the host's own files (the virtualenv, the interpreter, the project's
source): in a real container they live in image layers that no volume can hide, so where a
volume is mounted over one of them (the chart mounts an emptyDir at ``/tmp``, and a
checkout may live under ``/tmp``) the image path is bound back on top, read-only.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LIBC: Any = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Sandbox:
    """What a container process enters; ``netns`` None means the host's network."""

    netns: str | None
    hostname: str
    mounts: tuple[Mount, ...]
    workdir: str
    read_only_root: bool = False
    image_paths: tuple[str, ...] = ()
    """Host paths the image consists of; re-exposed where a volume would hide them."""


def image_paths() -> tuple[str, ...]:
    """What the local "image" is made of: this interpreter's prefixes and the directory the
    costwarden package is imported from (an editable install points at a checkout)."""
    import sys

    import costwarden

    source = Path(costwarden.__file__).resolve().parent.parent
    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), source}
    return tuple(sorted(str(path) for path in paths))


def shadowed(path: str, mounts: tuple[Mount, ...]) -> bool:
    """Whether a volume's mount point contains ``path`` (so the volume would hide it)."""
    parts = Path(path).parts
    return any(
        parts[: len(Path(m.target).parts)] == Path(m.target).parts and Path(m.target) != Path(path)
        for m in mounts
    )


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(_LIBC.mount(src, target.encode(), None, flags, None), f"mount {source} {target}")


def prepare_targets(sandbox: Sandbox) -> None:
    """Create missing mount points (on the host's filesystem: the mount namespace shares
    it). Empty directories are left behind; they hide nothing."""
    for mount in sandbox.mounts:
        target = Path(mount.target)
        if target.exists():
            continue
        if Path(mount.source).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def enter(sandbox: Sandbox) -> Callable[[], None]:
    """The ``preexec_fn`` that moves the child into ``sandbox``."""
    mounts = sorted(sandbox.mounts, key=lambda m: len(Path(m.target).parts))
    hidden = [p for p in sandbox.image_paths if shadowed(p, sandbox.mounts) and Path(p).exists()]
    netns_path = f"/run/netns/{sandbox.netns}" if sandbox.netns else None

    def preexec() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if netns_path is not None:
            fd = os.open(netns_path, os.O_RDONLY)
            _check(_LIBC.setns(fd, CLONE_NEWNET), "setns")
            os.close(fd)
        _check(_LIBC.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
        name = sandbox.hostname.encode()
        _check(_LIBC.sethostname(name, len(name)), "sethostname")
        _mount(None, "/", MS_REC | MS_PRIVATE)
        fds = [os.open(m.source, os.O_PATH) for m in mounts]
        image_fds = [os.open(p, os.O_PATH) for p in hidden]
        if sandbox.read_only_root:
            # Per-mount flag in this namespace only; the host's / stays writable.
            _mount(None, "/", MS_BIND | MS_REMOUNT | MS_RDONLY)
        for mount, fd in zip(mounts, fds, strict=True):
            _mount(f"/proc/self/fd/{fd}", mount.target, MS_BIND | MS_REC)
            # A bind mount inherits its source mount's flags (read-only once / is): set
            # the volume's own explicitly.
            _mount(None, mount.target, MS_BIND | MS_REMOUNT | (MS_RDONLY if mount.read_only else 0))
            os.close(fd)
        for path, fd in zip(hidden, image_fds, strict=True):
            os.makedirs(path, exist_ok=True)  # inside the volume that hides it
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
            _mount(None, path, MS_BIND | MS_REMOUNT | MS_RDONLY)
            os.close(fd)
        os.chdir(sandbox.workdir)

    return preexec
