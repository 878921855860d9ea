"""Provider keys, resolved from the Secret references in the configuration.

The chart mounts each referenced Secret at ``<credentials-dir>/<namespace>/<name>/`` (one
file per key, as Kubernetes mounts Secrets), so ``CredentialRef(ns, name, key)`` is the
file ``<credentials-dir>/<ns>/<name>/<key>``. Without a file, the environment variable
``COSTWARDEN_CREDENTIAL_<NS>_<NAME>_<KEY>`` (upper-cased, other characters as ``_``) is
used, which suits a sidecar that gets the key from ``env.valueFrom.secretKeyRef``.

A key is re-read at most every :data:`RECHECK_SECONDS` so a rotated Secret takes effect
without a restart. Keys are only ever put into upstream request headers: never logged,
never in records or metrics.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from costwarden.api.gatewayconfig import CredentialRef

RECHECK_SECONDS = 30.0
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def env_name(ref: CredentialRef) -> str:
    parts = (ref.namespace, ref.name, ref.key)
    return "COSTWARDEN_CREDENTIAL_" + "_".join(_NOT_ALNUM.sub("_", p).upper() for p in parts)


class Credentials:
    def __init__(self, directory: Path | None = None) -> None:
        self._dir = directory
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}

    def api_key(self, ref: CredentialRef | None) -> str:
        """The key for ``ref``, or "" (an in-cluster model may need none)."""
        if ref is None:
            return ""
        cache_key = (ref.namespace, ref.name, ref.key)
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and now - cached[0] < RECHECK_SECONDS:
            return cached[1]
        value = self._read(ref)
        self._cache[cache_key] = (now, value)
        return value

    def _read(self, ref: CredentialRef) -> str:
        if self._dir is not None:
            path = self._dir / ref.namespace / ref.name / ref.key
            try:
                return path.read_text().strip()
            except OSError:
                pass
        return os.environ.get(env_name(ref), "").strip()
