"""core/v1 Events through the lean REST client: what ``kubectl describe`` shows a person."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from costwarden.controllers.rest import ApiError, Rest

log = logging.getLogger(__name__)


def event_body(
    *,
    api_version: str,
    kind: str,
    namespace: str,
    name: str,
    uid: str,
    event_type: str,
    reason: str,
    message: str,
) -> dict[str, Any]:
    """A core/v1 Event on the object, as ``kubectl describe`` shows it."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": api_version,
            "kind": kind,
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": "costwarden-operator"},
        "reportingComponent": "costwarden.io/operator",
        "reportingInstance": "costwarden-operator",
    }


async def post_event(rest: Rest, body: dict[str, Any]) -> None:
    """Post an :func:`event_body`. Never raises: a lost Event must not undo or block an
    enforcement action."""
    meta, target = body["metadata"], body["involvedObject"]
    try:
        await rest.post(f"/api/v1/namespaces/{meta['namespace']}/events", body)
    except (ApiError, OSError) as error:
        log.warning(
            "could not post Event %s on %s %s/%s: %s",
            body["reason"], target["kind"], meta["namespace"], target["name"], error,
        )  # fmt: skip
