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
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from costwarden.controllers.rest import ApiError, Rest, jobs_path

log = logging.getLogger(__name__)

WATCH_SECONDS = 300
PAGE = 500
JobHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


async def watch_jobs(rest: Rest, handle: JobHandler, *, ready: asyncio.Event | None = None) -> None:
    version: str | None = None
    backoff = 1.0
    while True:
        try:
            if version is None:
                version = await _list(rest, handle)
                if ready is not None:
                    ready.set()
            params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
            async for event in rest.watch(jobs_path(), params, timeout=WATCH_SECONDS):
                kind = event.get("type", "")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        version = None  # too old: list again
                    break
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind != "BOOKMARK":
                    await handle(kind, obj)
            backoff = 1.0
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # Any failure (a dropped connection such as aiohttp's ServerDisconnectedError or
            # ClientPayloadError, a timeout, a handler's error) resumes the watch: nothing
            # restarts this task, so letting one escape would stop enforcement for good.
            if isinstance(error, ApiError) and error.status == 410:
                version = None
            log.warning(
                "Job watch interrupted (%s: %s); resuming in %.0fs",
                type(error).__name__, error, backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


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
