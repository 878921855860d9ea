"""The JSON error answer of the operator's own HTTP endpoints (usage, leases, results),
in the providers' shape: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import orjson
from aiohttp import web


def error_response(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


__all__ = ["error_response"]
