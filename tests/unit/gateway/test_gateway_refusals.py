"""Every refusal in the request path: the documented status and error body, no upstream
call, a record that costs nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import orjson
import pytest

from costwarden.api.gatewayconfig import SpendState
from costwarden.api.teambudget import (
    HardCapEnforcement,
    LoopDetection,
    PerJobLimits,
    RequestAction,
    TokenCaps,
)
from costwarden.api.usage import LoopKind, Outcome
from costwarden.gateway.identity import SharedIdentifier, SidecarIdentifier
from costwarden.policy import reservation as reserve
from costwarden.testing.gateway import TEAM_ID, model, sample_config
from costwarden.testing.upstream import FakeUpstream, ServerThread

from .conftest import CHAT, MESSAGE, StartGateway, records

RESERVATION = "budget_reservation_failed"
SMALL_CHAT = {**CHAT, "max_tokens": 5}


def worst_case(body: dict[str, Any]) -> Decimal:
    """What the gateway reserves for ``body`` sent as compact JSON to gpt-4o-mini (the
    default model: no fallbacks)."""
    pricing = model("gpt-4o-mini", "http://x").pricing
    return reserve.worst_cost(reserve.prompt_token_bound(orjson.dumps(body)), 5, pricing)


def room_for_one(body: dict[str, Any]) -> Decimal:
    """Money (six decimals) for one worst case of ``body`` and 1-2 millionths more: less
    than any call's metered cost (5 output tokens alone cost 3 millionths)."""
    return (worst_case(body) + Decimal("0.000001")).quantize(Decimal("0.000001"), ROUND_CEILING)


def worst_tokens(body: dict[str, Any]) -> int:
    return reserve.prompt_token_bound(orjson.dumps(body)) + 5


def post_raw(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        content=orjson.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def spend(spent: str) -> SpendState:
    now = datetime.now(UTC)
    return SpendState(
        spent_usd=Decimal(spent),
        period_start=now - timedelta(days=1),
        period_end=now + timedelta(1),
    )


def post(
    url: str, body: dict[str, Any], path: str = "/v1/chat/completions", **kw: Any
) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10, **kw)


def assert_openai_refusal(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert response.headers["x-costwarden-refusal"] == code
    return error


def assert_costs_nothing(gateway: Any, fake: FakeUpstream, code: str) -> None:
    last = records(gateway).records[-1]
    assert last.outcome is Outcome.REFUSED
    assert last.reason == code
    assert last.cost_usd == 0
    assert not last.usage_reported
    assert last.tokens.input == last.tokens.output == 0


def test_hard_cap_refuses_with_429_naming_the_budget(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(team={"spend": spend("100")})

    error = assert_openai_refusal(post(gateway.url, CHAT), 429, "hard_cap_reached")

    assert TEAM_ID in error["message"]
    assert "100" in error["message"]
    assert fake.calls == []
    assert_costs_nothing(gateway, fake, "hard_cap_reached")


def test_hard_cap_with_allow_lets_calls_through(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(
        team={
            "spend": spend("100"),
            "on_hard_cap": HardCapEnforcement(requests=RequestAction.ALLOW),
        }
    )

    assert post(gateway.url, CHAT).status_code == 200
    assert records(gateway).records[-1].outcome is Outcome.OK


def test_hard_cap_counts_usage_metered_since_the_snapshot(start_gateway: StartGateway) -> None:
    # Left under the cap: one worst case and a millionth of a dollar. The first call fits;
    # its metered cost (more than that millionth) leaves too little for the second.
    left = room_for_one(SMALL_CHAT)
    gateway = start_gateway(team={"spend": spend(str(100 - left)), "soft_limit_usd": Decimal(50)})

    assert post_raw(gateway.url, SMALL_CHAT).status_code == 200
    assert records(gateway).records[-1].cost_usd > Decimal("0.000002")
    error = assert_openai_refusal(post_raw(gateway.url, SMALL_CHAT), 429, RESERVATION)
    assert TEAM_ID in error["message"]


def test_anthropic_refusal_uses_anthropic_error_shape(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(team={"spend": spend("100")})

    response = post(gateway.url, MESSAGE, "/v1/messages")

    assert response.status_code == 429
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "hard_cap_reached"
    assert TEAM_ID in body["error"]["message"]
    assert fake.calls == []


def test_per_job_cost_cap(start_gateway: StartGateway, fake: FakeUpstream) -> None:
    cap = room_for_one(SMALL_CHAT)
    gateway = start_gateway(team={"per_job": PerJobLimits(max_cost_usd=cap)})

    assert post_raw(gateway.url, SMALL_CHAT).status_code == 200
    response = post_raw(gateway.url, SMALL_CHAT)
    error = assert_openai_refusal(response, 429, RESERVATION)

    assert response.headers["x-costwarden-reservation-limit"] == "job_cost"
    assert "agent-1" in error["message"]
    assert "maxCostUSD" in error["message"]
    assert len(fake.calls) == 1
    assert_costs_nothing(gateway, fake, RESERVATION)


def test_per_job_cost_cap_already_spent_is_refused_as_before(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(team={"per_job": PerJobLimits(max_cost_usd=Decimal("0.000001"))})
    job = gateway.gateway.limits.job(TEAM_ID, "agent-1")
    job.cost = Decimal("0.000001")

    assert_openai_refusal(post_raw(gateway.url, SMALL_CHAT), 429, "job_cost_cap_reached")
    assert fake.calls == []


def test_per_job_token_cap(start_gateway: StartGateway, fake: FakeUpstream) -> None:
    gateway = start_gateway(team={"per_job": PerJobLimits(max_tokens=worst_tokens(SMALL_CHAT) + 1)})

    assert post_raw(gateway.url, SMALL_CHAT).status_code == 200
    response = post_raw(gateway.url, SMALL_CHAT)
    error = assert_openai_refusal(response, 429, RESERVATION)

    assert response.headers["x-costwarden-reservation-limit"] == "job_tokens"
    assert "maxTokens" in error["message"]
    assert len(fake.calls) == 1


def test_per_job_rate_limit(start_gateway: StartGateway, fake: FakeUpstream) -> None:
    gateway = start_gateway(team={"per_job": PerJobLimits(max_requests_per_minute=2)})
    bodies = [{**CHAT, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]

    assert [post(gateway.url, b).status_code for b in bodies[:2]] == [200, 200]
    error = assert_openai_refusal(post(gateway.url, bodies[2]), 429, "job_rate_limited")

    assert "maxRequestsPerMinute=2" in error["message"]
    assert len(fake.calls) == 2
    assert_costs_nothing(gateway, fake, "job_rate_limited")


def test_identical_requests_trip_the_loop_detector(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(team={"loop_detection": LoopDetection(identical_requests=3)})

    assert [post(gateway.url, CHAT).status_code for _ in range(2)] == [200, 200]
    error = assert_openai_refusal(post(gateway.url, CHAT), 429, "retry_loop_detected")
    other = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
    assert_openai_refusal(post(gateway.url, other), 429, "retry_loop_detected")

    assert "identical requests" in error["message"]
    assert len(fake.calls) == 2
    signals = records(gateway).loop_signals
    assert len(signals) == 1  # one signal per trip, not one per refused call
    assert (signals[0].team, signals[0].job, signals[0].loop) == (
        TEAM_ID,
        "agent-1",
        LoopKind.IDENTICAL_REQUESTS,
    )
    assert_costs_nothing(gateway, fake, "retry_loop_detected")


def test_consecutive_upstream_errors_trip_the_loop_detector(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(team={"loop_detection": LoopDetection(consecutive_errors=2)})
    fake.script("gpt-4o-mini", "500", "500")
    bodies = [{**CHAT, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]

    assert [post(gateway.url, b).status_code for b in bodies[:2]] == [500, 500]
    assert_openai_refusal(post(gateway.url, bodies[2]), 429, "retry_loop_detected")

    assert records(gateway).loop_signals[0].loop is LoopKind.CONSECUTIVE_ERRORS
    assert len(fake.calls) == 2


@pytest.mark.parametrize(
    ("headers", "path", "body"),
    [
        ({}, "/v1/chat/completions", CHAT),
        ({"Authorization": "Bearer not-a-known-key"}, "/v1/chat/completions", CHAT),
        ({"x-api-key": "not-a-known-key"}, "/v1/messages", MESSAGE),
    ],
)
def test_unattributed_caller_gets_401(
    start_gateway: StartGateway, fake: FakeUpstream, headers: dict[str, str], path: str, body: Any
) -> None:
    gateway = start_gateway(identifier=SharedIdentifier(None, None))
    # A team header chosen by the caller never identifies it.
    response = post(gateway.url, body, path, headers={**headers, "X-Costwarden-Team": TEAM_ID})

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unattributed_caller"
    assert error["type"] == "authentication_error"
    assert fake.calls == []
    assert_costs_nothing(gateway, fake, "unattributed_caller")


def test_unauthenticated_call_is_refused_before_its_body_is_read(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    """Headers announce a 64 MiB body, 1 KiB of it is sent, and the client then waits: the
    401 arrives at once (the gateway never waits for, reads or parses the body) and the
    connection is closed (the rest is not drained either)."""
    gateway = start_gateway(identifier=SharedIdentifier(None, None))
    answer = send_partial_body(gateway.url, "/v1/chat/completions", 64 * 1024 * 1024)

    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"unattributed_caller" in answer
    assert fake.calls == []
    assert_costs_nothing(gateway, fake, "unattributed_caller")


def send_partial_body(url: str, path: str, announced: int) -> bytes:
    """Send a POST announcing ``announced`` bytes of body but only 1 KiB of it; return
    everything the server answers before it closes the connection (5 s deadline)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n"
        )
        sock.sendall(head.encode() + b"{" + b" " * 1023)
        answer = b""
        while chunk := sock.recv(65536):  # socket.timeout (a failure) if it never answers
            answer += chunk
        return answer


def test_confidential_with_no_in_cluster_route_is_refused(
    upstream: ServerThread, start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    config = sample_config(upstream.url)
    config.policies[0].rules = [r for r in config.policies[0].rules if r.name != "confidential"]
    gateway = start_gateway(config)

    response = post(gateway.url, CHAT, headers={"X-Costwarden-Sensitivity": "Confidential"})

    error = assert_openai_refusal(response, 403, "confidential_requires_in_cluster")
    assert "InCluster" in error["message"]
    assert fake.calls == []
    assert_costs_nothing(gateway, fake, "confidential_requires_in_cluster")


def test_caller_outside_every_team_is_refused(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(identifier=SidecarIdentifier("other-ns", "pod-1", None))

    error = assert_openai_refusal(post(gateway.url, CHAT), 403, "no_team_budget")

    assert "other-ns" in error["message"]
    assert fake.calls == []


def test_invalid_sensitivity_is_a_400(gateway: Any, fake: FakeUpstream) -> None:
    response = post(gateway.url, CHAT, headers={"X-Costwarden-Sensitivity": "secret"})

    assert_openai_refusal(response, 400, "invalid_request")


def test_token_cap_counts_as_the_hard_cap(start_gateway: StartGateway, fake: FakeUpstream) -> None:
    gateway = start_gateway(team={"token_caps": TokenCaps(total=worst_tokens(SMALL_CHAT) + 1)})

    assert post_raw(gateway.url, SMALL_CHAT).status_code == 200
    response = post_raw(gateway.url, SMALL_CHAT)
    error = assert_openai_refusal(response, 429, RESERVATION)

    assert response.headers["x-costwarden-reservation-limit"] == "team_tokens"
    assert "total-token cap" in error["message"]
    assert len(fake.calls) == 1


def test_a_full_ledger_refuses_calls_with_503_before_any_upstream_call(
    start_gateway: StartGateway, fake: FakeUpstream, tmp_path: Any
) -> None:
    """At --ledger-max-bytes a call is refused (503 ledger_full), never made unrecorded."""
    from costwarden.gateway.sinks import JsonlLedgerSink

    ledger = tmp_path / "usage.jsonl"
    gateway = start_gateway(sink=JsonlLedgerSink(ledger, max_bytes=1))

    assert post(gateway.url, CHAT).status_code == 200  # the first line reaches the bound
    lines = ledger.read_bytes().count(b"\n")
    response = post(gateway.url, CHAT)

    assert_openai_refusal(response, 503, "ledger_full")
    assert len(fake.calls) == 1
    assert ledger.read_bytes().count(b"\n") == lines == 1
