"""A gateway configuration and a gateway runner for tests, the demo and the benchmark.

:func:`sample_config` builds a realistic GatewayConfig pointed at a local upstream: one
team (``team-a/budget``, namespace ``team-a``) whose RoutingPolicy declares OpenAI and
Anthropic models, an in-cluster model, embeddings, rules and a soft-limit downgrade.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from costwarden.api.catalog import default_catalog
from costwarden.api.gatewayconfig import (
    CredentialRef,
    GatewayConfig,
    ModelRoute,
    PolicyConfig,
    ResolvedPricing,
    SpendState,
    TeamConfig,
)
from costwarden.api.routingpolicy import Locality, ModelPricing, Provider
from costwarden.api.teambudget import Period
from costwarden.api.usage import UsageSink
from costwarden.gateway.config import ConfigStore
from costwarden.gateway.credentials import Credentials
from costwarden.gateway.egress import Egress
from costwarden.gateway.identity import Identifier, SidecarIdentifier
from costwarden.gateway.proxy import Gateway
from costwarden.gateway.server import GatewayServer
from costwarden.gateway.sinks import MemorySink
from costwarden.gateway.upstream import make_upstream
from costwarden.policy.pricing import resolve_pricing
from costwarden.policy.provider_keys import mirrored_key
from costwarden.testing.upstream import ServerThread

TEAM_ID = "team-a/budget"
POLICY_ID = "team-a/policy"
NAMESPACE = "team-a"
PROVIDER_KEY = "sk-provider-secret-key"
CLAUDE_PRICING = ModelPricing(
    input_per_m_tok_usd=Decimal("3.00"),
    output_per_m_tok_usd=Decimal("15.00"),
    cached_input_per_m_tok_usd=Decimal("0.30"),
    cache_write_per_m_tok_usd=Decimal("3.75"),
)
LOCAL_PRICING = ModelPricing(
    input_per_m_tok_usd=Decimal("0.01"), output_per_m_tok_usd=Decimal("0.02")
)


def _pricing(
    upstream_model: str,
    declared: ModelPricing | None = None,
    provider: Provider = Provider.OPENAI,
) -> ResolvedPricing:
    from costwarden.api.routingpolicy import ModelBackend

    backend = ModelBackend(
        name="x",
        provider=provider,
        endpoint="https://api.example.com/v1",
        upstream_model=upstream_model,
        pricing=declared,
    )
    resolved = resolve_pricing(backend, default_catalog())
    assert resolved is not None, f"no price for {upstream_model}"
    return resolved


def model(
    name: str,
    base: str,
    *,
    provider: Provider = Provider.OPENAI,
    upstream_model: str | None = None,
    locality: Locality = Locality.EXTERNAL,
    pricing: ModelPricing | None = None,
) -> ModelRoute:
    upstream = upstream_model or name
    endpoint = f"{base}/v1" if provider is Provider.OPENAI else base
    return ModelRoute(
        name=name,
        provider=provider,
        endpoint=endpoint,
        upstream_model=upstream,
        locality=locality,
        credentials=CredentialRef(namespace=NAMESPACE, name="llm-keys", key="api-key"),
        pricing=_pricing(upstream, pricing, provider),
    )


def sample_config(upstream: str, **team_overrides: Any) -> GatewayConfig:
    """A one-team configuration routed to the local upstream at ``upstream``."""
    now = datetime.now(UTC)
    models = [
        model("gpt-4o", upstream),
        model("gpt-4o-mini", upstream),
        model("text-embedding-3-small", upstream),
        model(
            "local-llama",
            upstream,
            upstream_model="llama-3.1-8b",
            locality=Locality.IN_CLUSTER,
            pricing=LOCAL_PRICING,
        ),
        model(
            "claude-sonnet",
            upstream,
            provider=Provider.ANTHROPIC,
            upstream_model="claude-fake-sonnet",
            pricing=CLAUDE_PRICING,
        ),
        model(
            "claude-haiku",
            upstream,
            provider=Provider.ANTHROPIC,
            upstream_model="claude-fake-haiku",
            pricing=CLAUDE_PRICING,
        ),
    ]
    policy = PolicyConfig.model_validate(
        {
            "id": POLICY_ID,
            "models": [m.model_dump(by_alias=True) for m in models],
            "defaultModel": "gpt-4o-mini",
            "rules": [
                {
                    "name": "confidential",
                    "match": {"sensitivities": ["Confidential"]},
                    "model": "local-llama",
                },
                {
                    "name": "claude",
                    "match": {"requestedModels": ["claude-fake-sonnet"]},
                    "model": "claude-sonnet",
                    "fallbacks": ["claude-haiku"],
                },
                {
                    "name": "code-review",
                    "match": {"tasks": ["code-review"]},
                    "model": "gpt-4o",
                    "fallbacks": ["gpt-4o-mini"],
                },
            ],
            "softLimitDowngrades": [{"from": "gpt-4o", "to": "gpt-4o-mini"}],
            "promptCacheAffinity": True,
        }
    )
    team: dict[str, Any] = {
        "id": TEAM_ID,
        "namespaces": [NAMESPACE],
        "period": Period(),
        "hard_cap_usd": Decimal(100),
        "soft_limit_usd": Decimal(80),
        "routing_policy": POLICY_ID,
        "spend": SpendState(
            period_start=now - timedelta(days=1), period_end=now + timedelta(days=29)
        ),
    }
    team.update(team_overrides)
    return GatewayConfig(teams=[TeamConfig(**team)], policies=[policy], revision="rev-1")


def with_pricing(config: GatewayConfig, name: str, pricing: ModelPricing) -> GatewayConfig:
    """``config`` with model ``name`` of its first policy priced at ``pricing``."""
    policy = config.policies[0]
    models = [
        model(m.name, m.endpoint.removesuffix("/v1"), provider=m.provider,
              upstream_model=m.upstream_model, locality=m.locality, pricing=pricing)
        if m.name == name else m
        for m in policy.models
    ]  # fmt: skip
    return config.model_copy(
        update={"policies": [policy.model_copy(update={"models": models}), *config.policies[1:]]}
    )


class GatewayThread(ServerThread):
    """A gateway on 127.0.0.1 in a thread, identified as a sidecar of pod ``agent-1-x``."""

    def __init__(
        self,
        config: GatewayConfig | None,
        *,
        config_path: Path | None = None,
        identifier: Identifier | None = None,
        sink: UsageSink | None = None,
        credentials_dir: Path | None = None,
        upstream_client: str = "http1",
        egress: Egress | None = None,
    ) -> None:
        store = ConfigStore(config_path)
        if config is not None:
            store.set(config)
        else:
            store.poll()
        self.sink = sink if sink is not None else MemorySink()
        self.gateway = Gateway(
            config=store,
            identifier=identifier or sidecar_identity(),
            upstream=make_upstream(upstream_client, egress),
            sink=self.sink,
            credentials=Credentials(credentials_dir),
            replica_id="test-replica",
        )
        self._watch = config_path is not None
        self.server: GatewayServer | None = None
        super().__init__(self._build)

    async def _build(self) -> web.Server:
        self.server = GatewayServer(self.gateway, watch_config=self._watch)
        await self.server.start()
        return self.server.server

    async def after_cleanup(self) -> None:
        if self.server is not None:
            await self.server.stop()


def sidecar_identity(job: str = "agent-1", pod: str = "agent-1-x") -> SidecarIdentifier:
    labels = {"batch.kubernetes.io/job-name": job} if job else {}
    return SidecarIdentifier(NAMESPACE, pod, None, labels=labels)


def write_credentials(directory: Path, key: str = PROVIDER_KEY) -> Path:
    """The key of :func:`sample_config`'s models as the mounted provider-keys Secret holds it."""
    ref = CredentialRef(namespace=NAMESPACE, name="llm-keys", key="api-key")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / mirrored_key(ref)).write_text(key + "\n")
    return directory
