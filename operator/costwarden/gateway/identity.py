"""Who is calling: identified by what the caller cannot forge, never by a header it chooses.

- Sidecar mode: the sidecar shares the pod with its only caller, so the pod's identity
  (``POD_NAMESPACE``/``POD_NAME`` from the downward API env, labels from the downward-API
  labels file) is the caller's. Nothing in the request is trusted for identity.
- Shared mode: the bearer token (``Authorization: Bearer``, or ``x-api-key`` as Anthropic
  clients send it) is either a per-team key whose sha256 is listed in the keys file, or a
  Kubernetes service-account token that the API server vouches for (TokenReview); the
  pod it is bound to gives namespace, pod, labels and so job and team. Anything else is
  refused with 401.

The team itself is resolved against the configuration in force (``resolve_team``), so a
TeamBudget change re-attributes callers without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from costwarden.api.gatewayconfig import TeamConfig
from costwarden.gateway.config import CompiledConfig
from costwarden.gateway.watch import PolledFile

log = logging.getLogger("costwarden.gateway.identity")

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
_LABEL_LINE = re.compile(r'^([^=]+)="(.*)"$')


class UnattributedError(Exception):
    """The caller cannot be identified; the message says why (never echoing a secret)."""


class IdentityUnavailableError(Exception):
    """The credential could not be checked now (rate limit or API server too slow): the
    call is refused with ``status`` (429 or 503) and may be retried."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Caller:
    via: str
    """sidecar | token | key"""
    namespace: str = ""
    pod: str = ""
    job: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    team_id: str = ""
    """Set when the credential names the team itself (per-team keys)."""

    @property
    def unit(self) -> str:
        """What per-job limits and loop detection count against: the job, else the pod."""
        return self.job or self.pod or f"{self.via}:{self.namespace}"


def job_name(labels: Mapping[str, str]) -> str:
    return next((labels[k] for k in JOB_NAME_LABELS if labels.get(k)), "")


def resolve_team(caller: Caller, config: CompiledConfig) -> TeamConfig | None:
    if caller.team_id:
        return config.teams.get(caller.team_id)
    return config.team_for(caller.namespace, dict(caller.labels))


def parse_labels_file(text: str) -> dict[str, str]:
    """The downward API's labels file: ``key="value"`` lines, values with escapes."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        match = _LABEL_LINE.match(line.strip())
        if match:
            labels[match.group(1)] = match.group(2).encode().decode("unicode_escape")
    return labels


def bearer_token(headers: Mapping[str, str]) -> str:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Identifier(Protocol):
    async def identify(self, headers: Mapping[str, str]) -> Caller: ...


class SidecarIdentifier:
    """The pod's own identity; labels re-read when the downward-API file changes."""

    def __init__(
        self,
        namespace: str,
        pod: str,
        labels_file: Path | None,
        *,
        labels: dict[str, str] | None = None,
        job: str | None = None,
    ) -> None:
        if not namespace or not pod:
            raise ValueError("sidecar mode needs POD_NAMESPACE and POD_NAME (downward API env)")
        self._namespace, self._pod = namespace, pod
        self._job = job
        """Set by the injector from the Job controller's owner reference ("" for a pod no
        Job controller created); None only for a hand-run sidecar: then the labels say."""
        self._labels = PolledFile(labels_file, parse_labels_file, default=dict(labels or {}))
        self._caller = self._build(self._labels.value)

    @classmethod
    def from_env(cls, labels_file: Path | None, job: str | None = None) -> SidecarIdentifier:
        namespace, pod = os.environ.get("POD_NAMESPACE", ""), os.environ.get("POD_NAME", "")
        return cls(namespace, pod, labels_file, job=job)

    def _build(self, labels: dict[str, str]) -> Caller:
        job = job_name(labels) if self._job is None else self._job
        return Caller("sidecar", self._namespace, self._pod, job, labels)

    async def identify(self, headers: Mapping[str, str]) -> Caller:
        if self._labels.refresh():
            self._caller = self._build(self._labels.value)
        return self._caller


def parse_api_keys(text: str) -> dict[str, Caller]:
    """The keys file: ``{sha256-hex: team-id}`` or ``{sha256-hex: {team, namespace, job}}``."""
    import yaml

    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("the API keys file must be a mapping of sha256 hex to team")
    keys: dict[str, Caller] = {}
    for digest, entry in data.items():
        spec = entry if isinstance(entry, dict) else {"team": entry}
        team = str(spec.get("team", ""))
        namespace = str(spec.get("namespace") or team.partition("/")[0])
        keys[str(digest).lower()] = Caller(
            "key", namespace, "", str(spec.get("job", "")), {}, team_id=team
        )
    return keys


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Caller | None:
        """The caller a service-account token belongs to, or None if the API server says no."""
        ...


class SharedIdentifier:
    """Per-team keys first (a dict lookup), then TokenReview for anything token-shaped."""

    def __init__(self, keys_file: Path | None, verifier: TokenVerifier | None) -> None:
        empty: dict[str, Caller] = {}
        self._keys = PolledFile(keys_file, parse_api_keys, default=empty)
        self._verifier = verifier

    async def identify(self, headers: Mapping[str, str]) -> Caller:
        token = bearer_token(headers)
        if not token:
            raise UnattributedError(
                "no credential: send a service-account token or a costwarden team key as "
                "Authorization: Bearer (or x-api-key)"
            )
        self._keys.refresh()
        caller = self._keys.value.get(token_digest(token))
        if caller is not None:
            return caller
        if self._verifier is not None and token.count(".") == 2:
            caller = await self._verifier.verify(token)
            if caller is not None:
                return caller
            audiences = ", ".join(getattr(self._verifier, "audiences", None) or [])
            if audiences:
                raise UnattributedError(
                    f"the API server does not accept this service-account token for the "
                    f"audience {audiences}: a pod's default token is refused. Project one "
                    f"(a serviceAccountToken volume source with audience: {audiences}) and "
                    "send that file's content, see docs/agents.md"
                )
        raise UnattributedError(
            "the credential is neither a known costwarden team key nor a service-account "
            "token the API server accepts"
        )
