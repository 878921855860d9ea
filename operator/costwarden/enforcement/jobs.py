"""The batch/v1 Job adapter of :class:`~costwarden.enforcement.workload.StoppableWorkload`.

Suspending sets ``spec.suspend: true`` (as Kueue does): the Job controller deletes the
Job's running pods and creates none until it is resumed, and the Job keeps its completions
so far, so no finished work is lost. The labels and annotations that say why are written
in the same merge patch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from costwarden.enforcement.decisions import (
    is_finished,
    is_suspended,
    resume_patch,
    suspend_patch,
)
from costwarden.enforcement.workload import ResumeReason, StopMarks


class JobApi(Protocol):
    """The HTTP verbs the adapter needs (``controllers.rest.Rest`` provides them)."""

    async def merge_patch(self, path: str, body: Any) -> dict[str, Any]: ...

    async def delete(self, path: str, body: Any = None) -> dict[str, Any]: ...


class JobWorkload:
    kind = "Job"

    def __init__(self, api: JobApi, body: Mapping[str, Any]) -> None:
        self._api = api
        self.body = body
        meta = body.get("metadata") or {}
        self.namespace: str = meta.get("namespace", "")
        self.name: str = meta.get("name", "")
        self.uid: str = meta.get("uid", "")

    @property
    def path(self) -> str:
        return f"/apis/batch/v1/namespaces/{self.namespace}/jobs/{self.name}"

    def is_suspended(self) -> bool:
        return is_suspended(self.body)

    def is_finished(self) -> bool:
        return is_finished(self.body)

    async def suspend(self, marks: StopMarks) -> None:
        patch = suspend_patch(
            budget_uid=marks.budget_uid,
            budget_id=marks.budget_id,
            reason=marks.reason,
            at=marks.at,
            message=marks.message,
        )
        # Guarded by the uid: a Job deleted and re-created under the same name meanwhile
        # is a different Job, which the next pass decides on by itself.
        if self.uid:
            patch["metadata"]["uid"] = self.uid
        self.body = await self._api.merge_patch(self.path, patch)

    async def resume(self, reason: ResumeReason, at: str) -> None:
        self.body = await self._api.merge_patch(self.path, resume_patch(reason, at))

    async def delete(self, propagation: str) -> None:
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": propagation,
        }
        if self.uid:
            body["preconditions"] = {"uid": self.uid}
        await self._api.delete(self.path, body)
