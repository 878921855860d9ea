"""Upstream error bodies reach the tenant without key material or foreign pages."""

from __future__ import annotations

import orjson
import pytest

from costwarden.api.routingpolicy import Provider
from costwarden.gateway.sanitize import (
    MAX_MESSAGE,
    REDACTED,
    generic_message,
    sanitize_error,
    sanitize_stream_events,
    scrub,
)

KEY = "sk-proj-Zq81vXa7Lm3Rt9Pw2Kc5Yb0Hn4Jd6Fg"
FRAGMENT = KEY[14:26]  # 12 characters from the middle, no "sk-" prefix to spot
SECRETS = (KEY,)


def _openai(message: str, **extra: object) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", **extra}})


def _anthropic(message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": "authentication_error", "message": message}}
    )


def _no_key_material(body: bytes) -> None:
    text = body.decode()
    assert KEY not in text
    assert FRAGMENT not in text
    for size in (8, 10, 12):
        for start in range(len(KEY) - size + 1):
            assert KEY[start : start + size] not in text, KEY[start : start + size]


def test_the_whole_key_echoed_in_an_openai_error_is_redacted_and_the_shape_kept():
    body = _openai(
        f"Incorrect API key provided: {KEY}. You can find your key at ...", code="invalid_api_key"
    )

    clean = sanitize_error(Provider.OPENAI, 401, body, SECRETS)

    assert clean is not None
    _no_key_material(clean)
    error = orjson.loads(clean)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["message"].startswith("Incorrect API key provided: [redacted]")
    assert set(error) == {"message", "type", "param", "code"}


def test_a_12_character_fragment_without_prefix_is_redacted():
    body = _anthropic(f"invalid x-api-key ending in ...{FRAGMENT}")

    clean = sanitize_error(Provider.ANTHROPIC, 401, body, SECRETS)

    assert clean is not None
    _no_key_material(clean)
    assert orjson.loads(clean) == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": f"invalid x-api-key ending in ...{REDACTED}",
        },
    }


def test_masked_keys_bearer_tokens_and_key_pairs_are_redacted_without_knowing_the_key():
    text = scrub(
        "key sk-ab***yz rejected; header Authorization: Bearer eyJhbGciOi.abc.def; "
        "api_key=hunter2hunter2 token: 0123456789abcdef0123456789abcdef0123"
    )
    assert "sk-ab" not in text
    assert "eyJhbGciOi" not in text
    assert "hunter2" not in text
    assert "0123456789abcdef" not in text
    assert text.count(REDACTED) >= 4


def test_extra_fields_are_dropped_and_non_string_fields_nulled():
    body = orjson.dumps(
        {
            "error": {
                "message": "bad request",
                "type": "invalid_request_error",
                "param": {"nested": KEY},
                "code": 400,
                "debug": {"upstream_headers": {"authorization": f"Bearer {KEY}"}},
            },
            "request": {"headers": {"x-api-key": KEY}},
        }
    )

    clean = sanitize_error(Provider.OPENAI, 400, body, SECRETS)

    assert clean is not None
    _no_key_material(clean)
    assert orjson.loads(clean) == {
        "error": {
            "message": "bad request",
            "type": "invalid_request_error",
            "param": None,
            "code": "400",
        }
    }


def test_messages_are_bounded():
    clean = sanitize_error(Provider.OPENAI, 400, _openai("x " * 50_000), SECRETS)
    assert clean is not None
    assert len(orjson.loads(clean)["error"]["message"]) <= MAX_MESSAGE
    assert len(clean) < 2 * MAX_MESSAGE


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body><h1>502 Bad Gateway</h1>nginx internal-lb-7.corp</body></html>",
        f"401 Unauthorized: key {KEY} is not valid".encode(),
        b'{"kind":"Status","apiVersion":"v1","status":"Failure","message":"secrets is forbidden"}',
        b'["not", "an", "object"]',
        b'{"error": "a string, not the provider shape"}',
        b"",
    ],
    ids=["html", "text-with-key", "kubernetes-status", "json-array", "error-string", "empty"],
)
def test_a_body_without_the_provider_shape_is_withheld(body: bytes):
    assert sanitize_error(Provider.OPENAI, 401, body, SECRETS) is None
    assert sanitize_error(Provider.ANTHROPIC, 401, body, SECRETS) is None
    assert "withheld" in generic_message(401)
    assert "401" in generic_message(401)


def test_an_openai_stream_error_event_is_rebuilt_and_ordinary_events_pass_untouched():
    ordinary = b'data: {"choices":[{"delta":{"content":"no error here"}}]}'
    failing = b"data: " + _openai(f"upstream rejected key {KEY}")
    stream = ordinary + b"\n\n" + failing + b"\n\n"

    clean = sanitize_stream_events(Provider.OPENAI, stream, SECRETS)

    _no_key_material(clean)
    first, second, rest = clean.split(b"\n\n")
    assert first == ordinary
    assert rest == b""
    error = orjson.loads(second.removeprefix(b"data: "))["error"]
    assert error["message"] == "upstream rejected key [redacted]"


def test_an_anthropic_stream_error_event_with_a_fragment_is_rebuilt():
    event = b"event: error\ndata: " + _anthropic(f"overloaded; key ...{FRAGMENT}") + b"\n\n"

    clean = sanitize_stream_events(Provider.ANTHROPIC, event, SECRETS)

    _no_key_material(clean)
    assert clean.startswith(b"event: error\ndata: ")
    payload = orjson.loads(clean.split(b"data: ", 1)[1].split(b"\n\n")[0])
    assert payload["error"]["message"] == f"overloaded; key ...{REDACTED}"


def test_a_stream_error_event_without_the_shape_becomes_a_generic_error():
    event = b'data: {"error": {"detail": "' + KEY.encode() + b'"}}\n\n'

    clean = sanitize_stream_events(Provider.OPENAI, event, SECRETS)

    _no_key_material(clean)
    assert "withheld" in orjson.loads(clean.removeprefix(b"data: ").strip())["error"]["message"]
