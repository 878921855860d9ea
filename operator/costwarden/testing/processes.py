"""Child processes for tests, benchmarks and the demo: started with a log file, stopped
for sure, and probed with deadlines rather than sleeps."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from costwarden.children import exit_with_parent, terminate
from costwarden.ports import free_port

__all__ = ["ManagedProcess", "free_port"]


class ManagedProcess:
    """A child process whose output goes to a log file and which never outlives its owner."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # SIGTERM if we die first: the child still flushes (usage, peering) and exits.
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=exit_with_parent(signal.SIGTERM),
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: the gateway flushes usage, the operator leaves its peering),
        then SIGKILL at the deadline."""
        if self.process is not None:
            terminate(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like to the rest of the system."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def logs(self, tail: int | None = None) -> str:
        if not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:] if tail else lines)

    def wait_http_ok(
        self, url: str, timeout: float = 30.0, *, context: ssl.SSLContext | None = None
    ) -> None:
        """Until ``url`` answers 2xx; fails early with the log tail if the process died.
        ``context``: the TLS context verifying an https ``url``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited:\n{self.logs(tail=40)}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as response:  # noqa: S310
                    if 200 <= response.status < 300:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url} in {timeout}s:\n{self.logs(40)}")
