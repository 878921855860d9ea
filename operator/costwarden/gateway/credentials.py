"""Provider keys, resolved from the Secret references in the configuration.

Shared gateway: the operator mirrors every referenced key into one Secret,
``<fullname>-provider-keys`` in its namespace, which the chart mounts at
``--credentials-dir`` (``/etc/costwarden/credentials``); ``CredentialRef(ns, name, key)``
is the file ``<credentials-dir>/<ns>_<name>_<key>``, named by
:func:`costwarden.policy.provider_keys.mirrored_key`, the function the operator writes
with. Sidecar (or without a file): the environment variable
``COSTWARDEN_CREDENTIAL_<NS>_<NAME>_<KEY>`` (upper-cased, other characters as ``_``),
which the injector sets from ``env.valueFrom.secretKeyRef`` for Secrets in the pod's own
namespace.

A key is re-read at most every :data:`RECHECK_SECONDS` so a rotated Secret takes effect
without a restart (the kubelet updates a mounted Secret within about a minute). Keys are
only ever put into upstream request headers: never logged, never in records or metrics.
A model whose reference resolves to no key is never called (see ``gateway/forward.py``):
:meth:`Credentials.missing_message` says which Secret reference is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.policy.provider_keys import credential_env_name, mirrored_key, secret_reference

RECHECK_SECONDS = 30.0
MISSING_RECHECK_SECONDS = 5.0
"""A key found missing is looked for again sooner: calls to its model are being refused."""

SHARED_HINT = (
    "the operator mirrors it into the gateway's provider-keys Secret once it exists and the "
    "operator may read it (see the RoutingPolicy's Ready condition, docs/install-helm.md)"
)
SIDECAR_HINT = (
    "a sidecar only gets keys from Secrets in its pod's own namespace; use the shared "
    "gateway, or have the team's RoutingPolicy in this namespace reference a team-owned "
    "Secret here (docs/sidecar-injection.md)"
)


env_name = credential_env_name
"""The injector sets this variable (one function for both sides)."""


class Credentials:
    def __init__(self, directory: Path | None = None, *, hint: str = SHARED_HINT) -> None:
        self._dir = directory
        self._hint = hint
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}

    def api_key(self, ref: CredentialRef | None) -> str:
        """The key for ``ref``, or "" (an in-cluster model may need none)."""
        if ref is None:
            return ""
        cache_key = (ref.namespace, ref.name, ref.key)
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None:
            age, value = now - cached[0], cached[1]
            if age < (RECHECK_SECONDS if value else MISSING_RECHECK_SECONDS):
                return value
        value = self._read(ref)
        self._cache[cache_key] = (now, value)
        return value

    def missing_message(self, model: str, ref: CredentialRef) -> str:
        """Why a call to ``model`` is refused: the reference, never a value."""
        return (
            f"model {model!r} needs the provider key in {secret_reference(ref)}, which this "
            f"gateway does not have; the call was not sent. {self._hint}"
        )

    def _read(self, ref: CredentialRef) -> str:
        if self._dir is not None:
            path = self._dir / mirrored_key(ref)
            try:
                return path.read_text().strip()
            except OSError:
                pass
        return os.environ.get(env_name(ref), "").strip()
