"""The kubelet's atomic volume writer: a reader of a Secret/ConfigMap volume sees either
the old or the new set of files, never a mix.

Layout (as the real kubelet's AtomicWriter): files live in a timestamped directory
``..<timestamp>``; ``..data`` is a symlink to it; each user-visible top-level name is a
symlink ``<name> -> ..data/<name>``. An update writes a new directory, points
``..data_tmp`` at it and renames that over ``..data`` (one atomic rename), then removes
the old directory and names that no longer exist.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from costwarden.cluster.kubelet.podspec import Files

DATA = "..data"


def current_files(directory: Path) -> Files | None:
    """What the volume holds now (None if never written), to skip identical rewrites."""
    data = directory / DATA
    if not data.is_symlink():
        return None
    files: Files = {}
    root = data.resolve()
    for path in root.rglob("*"):
        if path.is_file():
            files[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return files


def write_atomically(directory: Path, files: Files) -> bool:
    """Make ``directory`` hold exactly ``files``; returns whether anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    if current_files(directory) == files:
        return False
    for relative in files:
        _check_relative(relative)
    fresh = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    fresh.mkdir()
    for relative, (content, mode) in files.items():
        target = fresh / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    previous = os.readlink(directory / DATA) if (directory / DATA).is_symlink() else None
    tmp = directory / f"{DATA}_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(fresh.name)
    tmp.rename(directory / DATA)
    _link_top_level(directory, {Path(p).parts[0] for p in files})
    if previous is not None:
        shutil.rmtree(directory / previous, ignore_errors=True)
    return True


def _link_top_level(directory: Path, names: set[str]) -> None:
    for name in names:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA}/{name}")
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in names:
            entry.unlink()


def _check_relative(relative: str) -> None:
    # The API server validates item paths; refuse anything escaping the volume anyway.
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts or parts[0].startswith(".."):
        raise ValueError(f"volume path {relative!r} is not a plain relative path")
