"""Per-team API keys for callers outside the cluster, issued by the operator.

Inside the cluster a caller proves who it is with its pod's service-account token (the
gateway asks the API server, TokenReview). A CI runner or a laptop has no such token, so
with ``--api-keys`` the operator issues each Ready team one random key, kept in a Secret
in the operator's namespace (``costwarden-key-<digest>``, labelled with the team) for the
platform team to hand out, and publishes only the keys' sha256 digests to the gateway (the
ConfigMap ``costwarden-api-keys``, mounted as ``--api-keys-file``). The gateway never sees
a key it could leak, and a digest cannot be turned back into a key.

Rotation: delete the team's Secret; the next pass issues a new key and the old one stops
working once the gateways reload the digests. A deleted TeamBudget loses its key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.controllers.kubeapi import MANAGED_BY

KEYS_CONFIG_MAP = "costwarden-api-keys"
KEYS_FILE_KEY = "api-keys.yaml"
SECRET_PREFIX = "costwarden-key-"
SECRET_DATA_KEY = "api-key"
TEAM_ANNOTATION = "costwarden.io/team"
KEY_LABEL = "costwarden.io/api-key"
KEY_PREFIX = "cwk_"


def secret_name(team_id: str) -> str:
    """A stable DNS-safe name per team (team ids contain a slash and can be long)."""
    return SECRET_PREFIX + hashlib.sha256(team_id.encode()).hexdigest()[:16]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyPlan:
    """What a pass must do: teams that need a key, Secrets of teams that are gone."""

    issue: tuple[str, ...]
    revoke: tuple[str, ...]


def plan_keys(teams: Iterable[str], issued: Mapping[str, str]) -> KeyPlan:
    """``issued`` maps team id → Secret name of the keys that exist."""
    wanted = set(teams)
    return KeyPlan(
        issue=tuple(sorted(wanted - issued.keys())),
        revoke=tuple(sorted(name for team, name in issued.items() if team not in wanted)),
    )


def digests_document(keys: Mapping[str, str]) -> str:
    """The gateway's keys file: ``{sha256(key): {team, namespace}}``, sorted for stable bytes."""
    entries = {
        key_digest(key): {"team": team, "namespace": team.partition("/")[0]}
        for team, key in keys.items()
    }
    return yaml.safe_dump(dict(sorted(entries.items())), sort_keys=True)


class ApiKeyIssuer:
    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core = core
        self.namespace = namespace

    async def sync(self, teams: Iterable[str]) -> None:
        existing = await self._issued()
        plan = plan_keys(teams, {team: name for team, (name, _) in existing.items()})
        keys = {team: key for team, (_, key) in existing.items()}
        for team in plan.issue:
            keys[team] = await self._issue(team)
        for name in plan.revoke:
            await asyncio.to_thread(self._delete_secret, name)
        live = {team: key for team, key in keys.items() if team not in _teams_of(existing, plan)}
        await asyncio.to_thread(self._write_digests, digests_document(live))

    async def _issued(self) -> dict[str, tuple[str, str]]:
        secrets_list = await asyncio.to_thread(
            self.core.list_namespaced_secret, self.namespace, label_selector=f"{KEY_LABEL}=true"
        )
        issued = {}
        for secret in secrets_list.items:
            meta = secret.metadata
            team = (meta.annotations or {}).get(TEAM_ANNOTATION) if meta else None
            encoded = (secret.data or {}).get(SECRET_DATA_KEY)
            if meta and meta.name and team and encoded:
                issued[team] = (meta.name, base64.b64decode(encoded).decode())
        return issued

    async def _issue(self, team: str) -> str:
        key = new_key()
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=secret_name(team),
                namespace=self.namespace,
                labels={**MANAGED_BY, KEY_LABEL: "true"},
                annotations={TEAM_ANNOTATION: team},
            ),
            type="Opaque",
            string_data={SECRET_DATA_KEY: key},
        )
        await asyncio.to_thread(self.core.create_namespaced_secret, self.namespace, body)
        return key

    def _delete_secret(self, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise

    def _write_digests(self, document: str) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=KEYS_CONFIG_MAP, namespace=self.namespace, labels=dict(MANAGED_BY)
            ),
            data={KEYS_FILE_KEY: document},
        )
        try:
            current = self.core.read_namespaced_config_map(KEYS_CONFIG_MAP, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            self.core.create_namespaced_config_map(self.namespace, body)
            return
        if (current.data or {}).get(KEYS_FILE_KEY) != document:
            self.core.replace_namespaced_config_map(KEYS_CONFIG_MAP, self.namespace, body)


def _teams_of(existing: Mapping[str, tuple[str, str]], plan: KeyPlan) -> set[str]:
    revoked = set(plan.revoke)
    return {team for team, (name, _) in existing.items() if name in revoked}
