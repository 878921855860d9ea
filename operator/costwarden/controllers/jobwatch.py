"""A lean watch of batch/v1 Jobs, outside Kopf's per-object machinery (BENCHMARKS.md).

One paginated LIST, then one WATCH from its resourceVersion, resumed from the last seen
version (bookmarks keep it fresh) and re-listed only when the API server says the
version is too old (410). Nothing of a Job is kept in memory: each event is handed to a
callback that decides (a finished Job is counted for cost per result, a new Job of an
exhausted team is stopped) and forgets it. So memory does not grow with the number of
Jobs, and the API requests at rest are one long-running WATCH.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from costwarden.controllers.rest import ApiError, Rest, jobs_path
from costwarden.supervision import Supervisor

WATCH_SECONDS = 300
PAGE = 500
JobHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


class JobWatch:
    """The watch's state (the last resourceVersion seen) outlives a failure: run under a
    supervisor, a restart after any exception (a dropped connection such as aiohttp's
    ServerDisconnectedError or ClientPayloadError, an API-server outage, a handler's
    error) resumes from where the watch was, and lists again only after a 410."""

    def __init__(
        self, rest: Rest, handle: JobHandler, *, ready: asyncio.Event | None = None
    ) -> None:
        self.rest = rest
        self.handle = handle
        self.ready = ready
        self.version: str | None = None

    async def run(self) -> None:
        try:
            while True:
                await self._once()
        except ApiError as error:
            if error.status == 410:
                self.version = None
            raise

    async def _once(self) -> None:
        if self.version is None:
            self.version = await _list(self.rest, self.handle)
            if self.ready is not None:
                self.ready.set()
        params = {"resourceVersion": self.version, "allowWatchBookmarks": "true"}
        async for event in self.rest.watch(jobs_path(), params, timeout=WATCH_SECONDS):
            kind = event.get("type", "")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    self.version = None  # too old: list again
                return
            self.version = obj.get("metadata", {}).get("resourceVersion") or self.version
            if kind != "BOOKMARK":
                await self.handle(kind, obj)


async def watch_jobs(
    rest: Rest,
    handle: JobHandler,
    *,
    ready: asyncio.Event | None = None,
    supervisor: Supervisor | None = None,
) -> None:
    """Watch Jobs for ever, restarted by ``supervisor`` (a private one if none) on any
    failure."""
    supervisor = supervisor or Supervisor("operator")
    await supervisor.start("job-watch", JobWatch(rest, handle, ready=ready).run)


async def _list(rest: Rest, handle: JobHandler) -> str:
    token = ""
    while True:
        params = {"limit": str(PAGE)}
        if token:
            params["continue"] = token
        page = await rest.get(jobs_path(), params)
        for item in page.get("items") or []:
            await handle("ADDED", item)
        meta = page.get("metadata") or {}
        token = meta.get("continue") or ""
        if not token:
            return str(meta.get("resourceVersion") or "")
