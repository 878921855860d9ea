"""A real S3-compatible server for the usage store's tests: moto's server, from its own
virtualenv under the cache (moto pins botocore, which requires python-dateutil<3, while
the kubernetes client needs >=3: they cannot share the project's environment).

Installed once (``pip install moto[server]==MOTO``), under a file lock, and reused."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from costwarden.cluster.binaries import cache_root

MOTO = "5.2.5"


def moto_server() -> Path:
    """The ``moto_server`` executable, installed on first use."""
    venv = cache_root() / f"moto-{MOTO}"
    binary = venv / "bin" / "moto_server"
    with _locked(venv.with_suffix(".lock")):
        if not binary.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "--quiet", f"moto[server]=={MOTO}"],
                check=True, timeout=900,
            )  # fmt: skip
    return binary


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
