"""The I/O half of ingestion's checks: the operator's own view of pods and prices.

:mod:`costwarden.accounting.trust` decides, purely, what an entry may count for; this
module gathers what it decides on:

- :class:`PodView`: pods read from the API server (GET, cached :data:`POD_FRESH` seconds,
  uid checked against a sidecar's token; a pod deleted since it was last seen is still
  known for :data:`POD_REMEMBERED` seconds, so the last calls of a finished Job count);
- :class:`PriceMemory`: the prices each team's policy gave each served model in the last
  :data:`PRICE_MEMORY` seconds, so a record priced just before a price change (the
  gateway's configuration lags the operator's by a reload) is not refused;
- :func:`check_batch`: every entry of a batch checked against both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from costwarden.accounting.batch import UsageBatch
from costwarden.accounting.trust import (
    Attribution,
    Check,
    Checked,
    PodFacts,
    Reporter,
    check_record,
    check_signal,
    pod_facts,
)
from costwarden.api.gatewayconfig import GatewayConfig, ResolvedPricing, TeamConfig
from costwarden.controllers.rest import ApiError, Rest

POD_FRESH = 30.0
POD_REMEMBERED = 600.0
MAX_PODS = 20_000
PRICE_MEMORY = 600.0


class TransientError(Exception):
    """The API server could not answer now: the batch is not applied (503) and re-sent."""


class PodView:
    def __init__(self, rest: Rest) -> None:
        self._rest = rest
        self._pods: dict[tuple[str, str], tuple[float, PodFacts]] = {}
        self.reads = 0

    async def get(self, namespace: str, name: str, uid: str = "") -> PodFacts | None:
        """The pod, or None if the API server does not know it (and it was not seen in the
        last POD_REMEMBERED seconds). ``uid`` (a sidecar token's) forces a re-read when the
        cached pod is another incarnation of the name."""
        key = (namespace, name)
        cached = self._pods.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < POD_FRESH and (not uid or cached[1].uid == uid):
            return cached[1]
        try:
            self.reads += 1
            body = await self._rest.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        except ApiError as error:
            if error.status == 404:
                if (
                    cached is not None
                    and now - cached[0] < POD_REMEMBERED
                    and (not uid or cached[1].uid == uid)
                ):
                    return cached[1]  # deleted since: its last calls still count
                self._pods.pop(key, None)
                return None
            raise TransientError(f"reading pod {namespace}/{name}: HTTP {error.status}") from error
        except (OSError, TimeoutError) as error:
            raise TransientError(f"reading pod {namespace}/{name}: {error}") from error
        facts = pod_facts(body)
        if len(self._pods) >= MAX_PODS:
            self._pods = {k: v for k, v in self._pods.items() if now - v[0] < POD_REMEMBERED}
            if len(self._pods) >= MAX_PODS:
                self._pods.clear()
        self._pods[key] = (now, facts)
        return facts


PriceKey = str


def _price_key(pricing: ResolvedPricing) -> PriceKey:
    """Every price a record's cost depends on (token kinds, service tiers, tool calls):
    two pricings with the same key price every record the same."""
    return pricing.model_dump_json(by_alias=True, exclude={"discount_percent"})


class PriceMemory:
    """What each team's policy priced each model at, in the configuration now and in the
    last PRICE_MEMORY seconds (fed with every configuration ingestion sees)."""

    def __init__(
        self, keep: float = PRICE_MEMORY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keep = keep
        self._clock = clock
        self._revision = ""
        self._current: dict[tuple[str, str], ResolvedPricing] = {}
        self._past: dict[tuple[str, str], dict[PriceKey, tuple[float, ResolvedPricing]]] = {}

    def observe(self, config: GatewayConfig) -> None:
        if config.revision and config.revision == self._revision:
            return
        moment = self._clock()
        current: dict[tuple[str, str], ResolvedPricing] = {}
        for team in config.teams:
            policy = config.policy(team.routing_policy)
            for route in policy.models if policy is not None else []:
                current[(team.id, route.name)] = route.pricing
        for key, pricing in self._current.items():
            if current.get(key) != pricing:  # changed or gone: remember it for a while
                self._past.setdefault(key, {})[_price_key(pricing)] = (moment, pricing)
        self._current = current
        self._revision = config.revision
        for key in list(self._past):
            kept = {k: v for k, v in self._past[key].items() if moment - v[0] < self._keep}
            if kept:
                self._past[key] = kept
            else:
                del self._past[key]

    def prices(self, team: TeamConfig, model: str) -> Sequence[ResolvedPricing]:
        key = (team.id, model)
        found = [self._current[key]] if key in self._current else []
        moment = self._clock()
        for since, pricing in self._past.get(key, {}).values():
            if moment - since < self._keep and pricing not in found:
                found.append(pricing)
        return found


async def check_batch(
    batch: UsageBatch,
    reporter: Reporter,
    config: GatewayConfig,
    pods: PodView,
    prices: PriceMemory,
    now: datetime,
) -> list[Checked]:
    """Every entry of ``batch``, checked; raises TransientError if a pod cannot be read."""
    prices.observe(config)
    wanted: set[tuple[str, str]] = set()
    for item in batch.items:
        entry = item.record or item.loop_signal
        if entry is None or not entry.pod or not entry.namespace:
            continue
        if not reporter.is_sidecar or (entry.namespace, entry.pod) == (
            reporter.namespace,
            reporter.pod,
        ):
            wanted.add((entry.namespace, entry.pod))
    uid = reporter.pod_uid if reporter.is_sidecar else ""
    found = await asyncio.gather(*(pods.get(ns, name, uid) for ns, name in sorted(wanted)))
    facts = dict(zip(sorted(wanted), found, strict=True))
    results: list[Checked] = []
    attribute = _memo(config)
    for item in batch.items:
        entry = item.record or item.loop_signal
        pod = facts.get((entry.namespace, entry.pod)) if entry is not None else None
        check = Check(reporter, config, now, prices.prices, pod, attribute)
        if item.record is not None:
            results.append(check_record(item.seq, item.record, check))
        elif item.loop_signal is not None:
            results.append(check_signal(item.seq, item.loop_signal, check))
        else:
            results.append(Checked(seq=item.seq))  # an empty entry: nothing to count
    return results


def _memo(config: GatewayConfig) -> Attribution:
    """``config.team_for_workload`` remembered per (namespace, labels) over one batch: a
    shared gateway's batch holds up to 2,000 entries of a few pods, and attribution walks
    every team."""
    seen: dict[tuple[str, frozenset[tuple[str, str]]], TeamConfig | None] = {}

    def attribute(namespace: str, labels: Mapping[str, str]) -> TeamConfig | None:
        key = (namespace, frozenset(labels.items()))
        if key not in seen:
            seen[key] = config.team_for_workload(namespace, dict(labels))
        return seen[key]

    return attribute


__all__ = ["PodView", "PriceMemory", "TransientError", "check_batch"]
