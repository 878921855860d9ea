"""Applies usage batches to TeamBudget status: one guarded patch per team, group-committed.

Every change to a team's books (usage, a Job's finish, an enforcement record) is a pure
*mutation* of :class:`~costwarden.accounting.books.Books`. Mutations for one team queue up
while a write for that team is in flight and are applied together in the next write
(group commit), so the number of status writes per team is bounded by the API server's
round trip, not by the number of gateway replicas or records. Each write reads the
object, applies the mutations to its books, and patches status with the object's
resourceVersion: a 409 means someone else wrote meanwhile, so the object is read again
and the mutations re-applied to the new books (never a blind overwrite). A caller's
future resolves only once its mutation is in the API server, which is when the ingestion
endpoint acknowledges a batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from costwarden.accounting.books import OWNED_FIELDS, Books, is_behind
from costwarden.accounting.ledger import prune_cursors
from costwarden.controllers import clock
from costwarden.controllers.budgets import Budget, BudgetIndex, verdict_for
from costwarden.controllers.rest import ApiError, Rest, budget_path
from costwarden.policy.caps import CapVerdict

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
TRANSIENT = {429, 500, 502, 503, 504}
RETRY_SECONDS = 0.05

Mutation = Callable[[Books, datetime], Any]
"""A pure change to a team's books; returns what the caller wants to know of it."""


@dataclass
class Commit:
    """What one write did: verdicts before and after, and each mutation's result."""

    budget: Budget
    before: CapVerdict
    after: CapVerdict
    books: Books
    results: list[Any] = field(default_factory=list)


class BudgetGoneError(Exception):
    """The TeamBudget was deleted (or became invalid): its usage cannot be kept."""


class Accountant:
    def __init__(
        self,
        rest: Rest,
        budgets: BudgetIndex,
        *,
        on_commit: Callable[[Commit], None] | None = None,
    ) -> None:
        self._rest = rest
        self._budgets = budgets
        self._writers: dict[str, _TeamWriter] = {}
        self._latest: dict[str, dict[str, Any]] = {}
        self.on_commit = on_commit
        self.writes = 0
        self.conflicts = 0

    async def mutate(self, budget_id: str, mutation: Mutation) -> tuple[Commit, Any]:
        """Apply ``mutation`` to the team's books durably; returns the commit and its result."""
        writer = self._writers.get(budget_id)
        if writer is None:
            writer = self._writers[budget_id] = _TeamWriter(self, budget_id)
        return await writer.submit(mutation)

    def budget(self, budget_id: str) -> Budget | None:
        return self._budgets.get(budget_id)

    def _current(self, budget: Budget) -> dict[str, Any] | None:
        """Our own last write, if newer than what the watch has delivered."""
        latest = self._latest.get(budget.id)
        if latest is None:
            return None
        observed = self._budgets_rv(budget.id)
        mine = latest.get("metadata", {}).get("resourceVersion", "")
        if observed and mine and _newer(observed, mine):
            return None
        return latest

    def status_of(self, budget: Budget) -> Mapping[str, Any]:
        """The newest status known: our own last write or the watch's copy, whichever is
        later, so a decision never rests on a status older than one we wrote."""
        latest = self._current(budget)
        return (latest.get("status") or {}) if latest is not None else budget.status

    def _budgets_rv(self, budget_id: str) -> str:
        return self._budgets.resource_version(budget_id)

    async def _commit(self, budget_id: str, mutations: list[Mutation]) -> tuple[Commit, list[Any]]:
        fresh: dict[str, Any] | None = None
        for _attempt in range(MAX_ATTEMPTS):
            budget = self._budgets.get(budget_id)
            if budget is None:
                raise BudgetGoneError(budget_id)
            obj = fresh or self._current(budget)
            status: Mapping[str, Any]
            if obj is not None:
                status = obj.get("status") or {}
                version = obj.get("metadata", {}).get("resourceVersion", "")
            else:
                status = budget.status
                version = self._budgets_rv(budget_id)
            commit, patch = self._apply(budget, status, mutations)
            if patch is None:
                return commit, commit.results
            body = {"metadata": {"resourceVersion": version}, "status": patch}
            try:
                written = await self._rest.merge_patch(
                    budget_path(budget.namespace, budget.name, status=True), body
                )
            except ApiError as error:
                if error.status == 409:
                    self.conflicts += 1
                    fresh = await self._read(budget)
                    continue
                if error.status == 404:
                    raise BudgetGoneError(budget_id) from error
                if error.status not in TRANSIENT:
                    raise
                await asyncio.sleep(RETRY_SECONDS * 2**_attempt)
                fresh = None
                continue
            except (aiohttp.ClientError, OSError, TimeoutError):
                # Unknown whether it landed: retrying is safe, the cursors make it a no-op.
                await asyncio.sleep(RETRY_SECONDS * 2**_attempt)
                fresh = await self._read(budget)
                continue
            self.writes += 1
            self._latest[budget_id] = written
            if self.on_commit is not None:
                self.on_commit(commit)
            return commit, commit.results
        raise RuntimeError(f"TeamBudget {budget_id}: {MAX_ATTEMPTS} conflicting writes in a row")

    async def _read(self, budget: Budget) -> dict[str, Any]:
        try:
            return await self._rest.get(budget_path(budget.namespace, budget.name))
        except ApiError as error:
            if error.status == 404:
                raise BudgetGoneError(budget.id) from error
            raise

    def _apply(
        self, budget: Budget, status: Mapping[str, Any], mutations: list[Mutation]
    ) -> tuple[Commit, dict[str, Any] | None]:
        now = clock.now()
        start, end = budget.period(now)
        if is_behind(status, start):
            # Another writer's clock is ahead and already opened the next period: follow it.
            recorded = datetime.fromisoformat(
                status["currentPeriod"]["start"].replace("Z", "+00:00")
            )
            start, end = budget.period(recorded)
        books = Books.read(status, start, end)
        before = verdict_for(budget.spec, books.spent, books.tokens, books.refused_need)
        results = [mutation(books, now) for mutation in mutations]
        prune_cursors(books, now)
        after = verdict_for(budget.spec, books.spent, books.tokens, books.refused_need)
        commit = Commit(budget, before, after, books, results)
        fragment = books.fragment()
        patch = {k: v for k, v in fragment.items() if status.get(k) != _without_nulls(v)}
        return commit, (patch or None)


def _without_nulls(value: Any) -> Any:
    """A fragment as the API server stores it: a merge patch's nulls delete keys."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _newer(a: str, b: str) -> bool:
    """Whether resourceVersion ``a`` is newer than ``b`` (numeric in every API server we
    know; if not, assume the watch is newer and fall back to it)."""
    try:
        return int(a) > int(b)
    except ValueError:
        return True


class _TeamWriter:
    """One team's queue: at most one write in flight; what queues meanwhile goes together."""

    def __init__(self, accountant: Accountant, budget_id: str) -> None:
        self._accountant = accountant
        self._budget_id = budget_id
        self._pending: list[tuple[Mutation, asyncio.Future[tuple[Commit, Any]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, mutation: Mutation) -> tuple[Commit, Any]:
        future: asyncio.Future[tuple[Commit, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((mutation, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                commit, results = await self._accountant._commit(
                    self._budget_id, [mutation for mutation, _ in batch]
                )
            except Exception as error:  # each waiting caller learns it was not applied
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result((commit, result))


__all__ = ["OWNED_FIELDS", "Accountant", "BudgetGoneError", "Commit", "Mutation"]
