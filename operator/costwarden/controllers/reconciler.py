"""The reconciler: one loop that turns the observed world into config, status and Events.

Why one loop for everything rather than one handler per object: the gateway configuration
is a function of *all* budgets and policies together, and a budget's readiness depends on
the policy it references. Recomputing the whole (pure, milliseconds for thousands of
objects) after any change, and writing only what differs, keeps every object consistent
with the others without ordering puzzles. It is level-triggered: a missed or coalesced
event costs nothing, because the next pass sees the current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from costwarden.accounting.held import HeldUsage
from costwarden.api import routingpolicy, teambudget
from costwarden.api.catalog import PriceCatalog, load_catalog
from costwarden.api.conditions import ConditionType, find_condition
from costwarden.api.endpoints import ANY_HOST, ProviderHosts
from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, GatewayConfig
from costwarden.api.meta import API_VERSION, Condition
from costwarden.controllers import clock, metrics
from costwarden.controllers.apikeys import ApiKeyIssuer
from costwarden.controllers.config_copies import ConfigCopies
from costwarden.controllers.events import event_body
from costwarden.controllers.kubeapi import ConflictError, KubeApi
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.provider_keys import ProviderKeysMirror
from costwarden.controllers.world import ObservedWorld
from costwarden.policy.provider_keys import with_credential_problems
from costwarden.policy.render import (
    BudgetVerdict,
    ObservedObject,
    PolicyVerdict,
    Reconciliation,
    reconcile,
    serialize,
)
from costwarden.policy.status import budget_status, changed_fields, policy_status
from costwarden.policy.validation import parse_team_budget_spec

log = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.2
"""Coalesce bursts (a `kubectl apply -f examples/` is many events) into one pass."""
RELIST_SECONDS = 300.0
"""How often the world is rebuilt from a LIST, healing any missed delete event."""
STATUS_WRITES_IN_FLIGHT = 8
"""Status patches run this many at a time: a thousand new budgets get their first status in
seconds, not a minute, without a burst the API server's priority and fairness would queue."""
RESYNC_SECONDS = 30.0
"""Without events, a pass still runs this often: period rollovers and drift heal by themselves."""


@dataclass(frozen=True)
class ReconcilerSettings:
    namespace: str
    config_map: str
    catalog: PriceCatalog
    provider_hosts: ProviderHosts = ANY_HOST


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        world: ObservedWorld,
        settings: ReconcilerSettings,
        leadership: Leadership,
        copies: ConfigCopies | None = None,
        api_keys: ApiKeyIssuer | None = None,
        provider_keys: ProviderKeysMirror | None = None,
    ) -> None:
        self.api = api
        self.world = world
        self.settings = settings
        self.leadership = leadership
        self.copies = copies  # sidecar injection on: config copies in opted-in namespaces
        self.api_keys = api_keys  # --api-keys: a key per Ready team, digests for gateways
        self.provider_keys = provider_keys  # --provider-keys-secret: the gateway's keys
        self._last_list = 0.0
        self.last_config: GatewayConfig | None = None
        """The configuration of the last pass: ingestion checks usage against it."""
        self.held = HeldUsage()
        """Teams whose usage ingestion holds: their UsageApplied condition."""

    async def run_forever(self) -> None:
        """Reconcile whenever the world changes (Kopf's watch events) or the resync is due.

        Run under the operator's supervisor (costwarden/supervision.py): a failed pass (an
        API-server outage, a bug) raises, and the supervisor restarts this loop with
        backoff, logging once per incident; the first pass after a (re)start runs at once.
        """
        self.world.changed.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.world.changed.wait(), RESYNC_SECONDS)
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.world.changed.clear()
            # Unknown leadership (the API server unreachable) answers False: paused.
            if not await self.leadership.is_leader():
                continue
            try:
                await self.reconcile_once()
            except ConflictError as conflict:
                # The watch event carrying the newer object re-triggers us; no blind overwrite.
                log.debug("conflict, waiting for the newer object: %s", conflict)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                self.world.changed.set()  # the restarted loop passes again at once
                raise

    async def relist(self) -> None:
        budgets = await self.api.list_objects(teambudget.PLURAL)
        policies = await self.api.list_objects(routingpolicy.PLURAL)
        namespaces = await self.api.list_namespaces()
        self.world.replace(budgets, policies, namespaces)
        self._last_list = time.monotonic()

    def relist_due(self) -> bool:
        return time.monotonic() - self._last_list > RELIST_SECONDS

    async def reconcile_once(self) -> Reconciliation:
        started = time.perf_counter()
        if self.relist_due():
            await self.relist()
            self.world.changed.clear()
        now = clock.now().replace(microsecond=0)  # shiftable in tests (clock.py)
        budgets = list(self.world.budgets.values())
        policies = list(self.world.policies.values())
        result = reconcile(
            budgets,
            policies,
            self.settings.catalog,
            now,
            self.settings.provider_hosts,
            consents=self.world.consents,
        )
        self.last_config = result.config
        await self._publish_config(result)
        if self.provider_keys is not None:  # before status: its problems are part of Ready
            plan = await self.provider_keys.sync(result.config)
            result.policies = with_credential_problems(result.policies, plan.problems)
        await _bounded_all(
            [self._write_policy_status(p, result.policies[p.id], now) for p in policies]
            + [self._write_budget_status(b, result.budgets[b.id], now) for b in budgets]
        )
        if self.copies is not None:  # after status: a copy that fails must not delay it
            await self.copies.sync({CONFIG_MAP_KEY: serialize(result.config)},
                                   result.config.revision)  # fmt: skip
        if self.api_keys is not None:
            await self.api_keys.sync(team.id for team in result.config.teams)
        metrics.observe_reconciliation(result, time.perf_counter() - started)
        return result

    async def _publish_config(self, result: Reconciliation) -> None:
        written = await self.api.write_config_map(
            self.settings.namespace,
            self.settings.config_map,
            {CONFIG_MAP_KEY: serialize(result.config)},
            {"costwarden.io/config-revision": result.config.revision},
        )
        if written:
            log.info(
                "published gateway configuration revision %s (%d teams, %d policies)",
                result.config.revision, len(result.config.teams), len(result.config.policies),
            )  # fmt: skip
        metrics.CONFIG_PUBLISHES.labels(result="written" if written else "unchanged").inc()

    async def _write_policy_status(
        self, policy: ObservedObject, verdict: PolicyVerdict, now: datetime
    ) -> None:
        desired = policy_status(verdict, policy.status, policy.generation, now)
        await self._write_status("RoutingPolicy", routingpolicy.PLURAL, "policy", policy, desired)

    async def _write_budget_status(
        self, budget: ObservedObject, verdict: BudgetVerdict, now: datetime
    ) -> None:
        parsed = parse_team_budget_spec(budget.spec)
        hard_cap: Decimal | None = None if isinstance(parsed, list) else parsed.hard_cap_usd
        held = self.held.summary(budget.id)
        desired = budget_status(verdict, budget.status, budget.generation, hard_cap, now, held)
        try:
            await self._write_status("TeamBudget", teambudget.PLURAL, "budget", budget, desired)
        except ApiException as error:
            # A held team's status may refuse any write (the reason it is held: an
            # admission policy, a webhook): that must not fail every pass; its UsageHeld
            # Event and metrics still say it (docs/operations.md).
            if held is None or not held.entries or error.status not in _REFUSED:
                raise
            log.warning("TeamBudget %s: status (UsageApplied=False) not written: HTTP %s",
                        budget.id, error.status)  # fmt: skip

    async def _write_status(
        self, kind: str, plural: str, world_kind: str, obj: ObservedObject, desired: dict[str, Any]
    ) -> None:
        patch = changed_fields(desired, obj.status)
        if not patch:
            return
        await self.api.patch_status(
            plural, obj.namespace, obj.name, patch, self.world.version_of(world_kind, obj.id)
        )
        await self._announce_transitions(kind, obj, desired)

    async def _announce_transitions(
        self, kind: str, obj: ObservedObject, desired: dict[str, Any]
    ) -> None:
        """An Event for every condition that changed status or reason: what `kubectl
        describe` shows a person, and what alerting on Events picks up."""
        before = [Condition.model_validate(c) for c in obj.status.get("conditions") or []]
        for raw in desired.get("conditions", []):
            after = Condition.model_validate(raw)
            previous = find_condition(before, after.type)
            if previous and (previous.status, previous.reason) == (after.status, after.reason):
                continue
            if previous is None and after.type != ConditionType.READY and after.status == "False":
                continue  # a new budget under its limits is not news
            warning = (after.type in _GOOD_WHEN_TRUE) != (after.status == "True")
            await self.api.post_event(
                event_body(
                    api_version=API_VERSION,
                    kind=kind,
                    namespace=obj.namespace,
                    name=obj.name,
                    uid=obj.uid,
                    event_type="Warning" if warning else "Normal",
                    reason=after.reason,
                    message=f"{after.type}={after.status.value}: {after.message}",
                )
            )


_GOOD_WHEN_TRUE = frozenset({ConditionType.READY, ConditionType.USAGE_APPLIED})
_REFUSED = frozenset({400, 403, 413, 422})
"""API-server answers to a status write that a retry does not cure (ingest.permanent)."""


async def _bounded_all(writes: list[Coroutine[Any, Any, None]]) -> None:
    """Run the writes concurrently, a few at a time; all are attempted, then the first
    failure (a conflict, an outage) is raised so the pass is retried as a whole."""
    gate = asyncio.Semaphore(STATUS_WRITES_IN_FLIGHT)

    async def gated(write: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await write

    outcomes = await asyncio.gather(*(gated(w) for w in writes), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def load_settings(
    namespace: str,
    config_map: str,
    catalog_path: Path | None,
    provider_hosts: ProviderHosts = ANY_HOST,
) -> ReconcilerSettings:
    return ReconcilerSettings(namespace, config_map, load_catalog(catalog_path), provider_hosts)
