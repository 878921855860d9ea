"""Whether this replica is the one that writes, as Kopf's peering decides it.

Kopf pauses its watch handlers in every replica but the highest-priority live one. The
reconciler also wakes on a timer (period rollovers, resyncs), which Kopf does not pause,
so it asks the same question Kopf asks: is my priority the highest among live peers in
the peering object? Each replica gets a distinct random priority at start (Kopf pauses
*all* replicas on a tie), so exactly one is active and another takes over within the
peering lifetime when it dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from kubernetes import client

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
PEERING_PLURAL = "clusterkopfpeerings"
CACHE_SECONDS = 5.0

log = logging.getLogger(__name__)


def is_highest_live_peer(
    peers: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: datetime
) -> bool:
    """Kopf's rule: active iff no other live peer has the same or a higher priority."""
    for peer_id, info in peers.items():
        if peer_id == identity or not isinstance(info, Mapping):
            continue
        if not _is_live(info, now):
            continue
        if int(info.get("priority", 0)) >= priority:
            return False
    return True


def _is_live(info: Mapping[str, Any], now: datetime) -> bool:
    lastseen = info.get("lastseen")
    if not isinstance(lastseen, str):
        return False
    try:
        seen = datetime.fromisoformat(lastseen.replace("Z", "+00:00"))
    except ValueError:
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    return seen + timedelta(seconds=int(info.get("lifetime", 60))) > now


class Leadership:
    """Standalone (no peering): always the leader. Otherwise: read the peering object."""

    def __init__(
        self,
        api_client: client.ApiClient | None,
        *,
        peering_name: str | None,
        identity: str,
        priority: int,
    ) -> None:
        self._custom = client.CustomObjectsApi(api_client) if api_client else None
        self.peering_name = peering_name
        self.identity = identity
        self.priority = priority
        self._cached: tuple[float, bool] | None = None

    async def is_leader(self) -> bool:
        if self.peering_name is None or self._custom is None:
            return True
        if self._cached and time.monotonic() - self._cached[0] < CACHE_SECONDS:
            return self._cached[1]
        verdict = await self._ask()
        self._cached = (time.monotonic(), verdict)
        return verdict

    async def _ask(self) -> bool:
        assert self._custom is not None
        assert self.peering_name is not None
        try:
            body = await asyncio.to_thread(
                self._custom.get_cluster_custom_object,
                PEERING_GROUP, PEERING_VERSION, PEERING_PLURAL, self.peering_name,
            )  # fmt: skip
        except Exception as error:
            # Cannot tell (the API server may be down): writing blind could fight the real
            # leader, so this replica pauses until the peering object answers again.
            log.debug("leadership unknown, pausing: %s", type(error).__name__)
            return False
        peers = cast(dict[str, Any], body).get("status") or {}
        return is_highest_live_peer(peers, self.identity, self.priority, datetime.now(UTC))
