"""The gateway configuration: loaded from the mounted file, compiled, swapped on change.

A ConfigMap mount changes by an atomic symlink swap (``..data``), so the file is polled
(``os.stat`` follows the link) about once a second, no inotify needed. A changed file is
parsed and compiled (routing tables, model URLs, team index) off the request path and
swapped in with one assignment: a request keeps the configuration it started with, so a
reload drops nothing. A document that does not parse keeps the previous one in force and
is logged; the gateway is not ready until one document has loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from costwarden.api.endpoints import ProviderHosts
from costwarden.api.gatewayconfig import GatewayConfig, ModelRoute, TeamConfig
from costwarden.api.routingpolicy import Locality, Provider
from costwarden.api.usage import Endpoint
from costwarden.policy.routing import CompiledPolicy, compile_policy
from costwarden.policy.tenancy import attribute

log = logging.getLogger("costwarden.gateway.config")

_PATHS = {
    Endpoint.CHAT_COMPLETIONS: "/chat/completions",
    Endpoint.EMBEDDINGS: "/embeddings",
    Endpoint.MESSAGES: "/messages",
    Endpoint.RESPONSES: "/responses",
    Endpoint.COUNT_TOKENS: "/messages/count_tokens",
}


def upstream_url(model: ModelRoute, endpoint: Endpoint) -> str:
    """The URL of ``endpoint`` at the model's base URL.

    OpenAI bases end in ``/v1`` by convention (https://api.openai.com/v1); Anthropic's is
    often given without it (https://api.anthropic.com), so ``/v1`` is added when missing.
    """
    base = model.endpoint.rstrip("/")
    if model.provider is Provider.ANTHROPIC and not base.endswith("/v1"):
        base += "/v1"
    return base + _PATHS[endpoint]


@dataclass(frozen=True)
class CompiledConfig:
    """A GatewayConfig with every per-request lookup precomputed."""

    config: GatewayConfig
    revision: str
    teams: dict[str, TeamConfig]
    policies: dict[str, CompiledPolicy]
    urls: dict[tuple[str, str, Endpoint], str]
    # (policy id, model name) of External models whose host the admin does not allow.
    blocked: frozenset[tuple[str, str]] = frozenset()

    def host_allowed(self, policy_id: str, model: ModelRoute) -> bool:
        return (policy_id, model.name) not in self.blocked

    by_namespace: dict[str, list[TeamConfig]] = field(default_factory=dict)
    """Teams by governed namespace: attribution looks only at the caller's namespace."""

    def team_for(self, namespace: str, labels: dict[str, str]) -> TeamConfig | None:
        """policy.tenancy.attribute over the teams governing ``namespace``."""
        return attribute(self.by_namespace.get(namespace, ()), namespace, labels)

    def url(self, policy_id: str, model: ModelRoute, endpoint: Endpoint) -> str:
        return self.urls.get((policy_id, model.name, endpoint)) or upstream_url(model, endpoint)


def compile_config(config: GatewayConfig, raw: bytes) -> CompiledConfig:
    revision = config.revision or hashlib.sha256(raw).hexdigest()[:16]
    urls = {
        (p.id, m.name, e): upstream_url(m, e)
        for p in config.policies
        for m in p.models
        for e in Endpoint
    }
    hosts = ProviderHosts.parse(config.allowed_provider_hosts or ())
    blocked = frozenset(
        (p.id, m.name)
        for p in config.policies
        for m in p.models
        if m.locality is Locality.EXTERNAL and not hosts.allows_url(m.endpoint)
    )
    by_namespace: dict[str, list[TeamConfig]] = {}
    for team in config.teams:
        for namespace in team.namespaces:
            by_namespace.setdefault(namespace, []).append(team)
    return CompiledConfig(
        config=config,
        revision=revision,
        teams={t.id: t for t in config.teams},
        policies={p.id: compile_policy(p) for p in config.policies},
        urls=urls,
        blocked=blocked,
        by_namespace=by_namespace,
    )


def load_config(raw: bytes) -> CompiledConfig:
    return compile_config(GatewayConfig.model_validate_json(raw), raw)


class ConfigStore:
    """Holds the compiled configuration in force and keeps it in step with the file."""

    def __init__(self, path: Path | None, initial: CompiledConfig | None = None) -> None:
        self.path = path
        self.current: CompiledConfig | None = initial
        self._stamp: tuple[int, int, int] | None = None
        self._digest = ""
        self.reloads = 0
        self.errors = 0

    def set(self, config: GatewayConfig) -> CompiledConfig:
        """Install a configuration directly (tests, embedding)."""
        raw = config.model_dump_json(by_alias=True).encode()
        self.current = compile_config(config, raw)
        return self.current

    def poll(self) -> bool:
        """Reload if the file changed; True if a new configuration is now in force."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.warning("gateway config %s unreadable: %s", self.path, exc.strerror)
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return self._load(self.path.read_bytes())

    def _load(self, raw: bytes) -> bool:
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return False
        try:
            compiled = load_config(raw)
        except (ValidationError, ValueError) as exc:
            self.errors += 1
            log.error("gateway config %s rejected, keeping the previous one: %s", self.path, exc)
            return False
        self._digest = digest
        self.current = compiled
        self.reloads += 1
        log.info("gateway config loaded: revision %s", compiled.revision)
        return True
