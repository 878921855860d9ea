"""Reserve before forwarding, settle after (gateway/reservations.py, gateway/proxy.py):
the ledger, the ceiling sent upstream, modelCaps, and no leaked hold on any path."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from costwarden.api.accounting import ModelSpend
from costwarden.api.gatewayconfig import SpendState
from costwarden.api.teambudget import ModelCap
from costwarden.api.usage import Endpoint, Outcome
from costwarden.gateway.config import ConfigStore
from costwarden.gateway.credentials import Credentials
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.proxy import Gateway
from costwarden.gateway.reservations import Reservations
from costwarden.gateway.sinks import MemorySink
from costwarden.policy import reservation as reserve
from costwarden.testing.gateway import (
    TEAM_ID,
    model,
    sample_config,
    sidecar_identity,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread

from .conftest import CHAT, MESSAGE, StartGateway, records, wait_for

CODE_REVIEW = {"X-Costwarden-Task": "code-review"}  # gpt-4o, fallback gpt-4o-mini


def post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions", **kw: Any) -> Any:
    return httpx.post(
        url + path,
        content=orjson.dumps(body),
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
        timeout=10,
        **kw,
    )


def settled(gateway: Any) -> None:
    """Every call's hold released and the team's reserved gauge back at 0."""
    ledger = gateway.gateway.reservations
    wait_for(lambda: ledger.in_flight == 0 or None, what="every reservation settled")
    assert ledger.team(TEAM_ID).cost == 0
    gauge = gateway.gateway.metrics.reserved_usd.labels(TEAM_ID)
    assert gauge._value.get() == 0


def settlements(gateway: Any, basis: str) -> float:
    value: float = gateway.gateway.metrics.settlements.labels(TEAM_ID, basis)._value.get()
    return value


def test_ledger_holds_and_releases_exactly_once() -> None:
    changes: list[tuple[str, Decimal]] = []
    ledger = Reservations(on_change=lambda team, held: changes.append((team, held)))
    team = sample_config("http://x").teams[0]
    routes = (model("gpt-4o", "http://x"), model("gpt-4o-mini", "http://x"))
    worst = reserve.worst_case(100, 1000, routes)

    first = ledger.hold(team, "job-1", worst, routes)
    second = ledger.hold(team, "job-2", worst, routes[1:])
    assert ledger.team(TEAM_ID).cost == 2 * worst.cost
    assert ledger.team(TEAM_ID).tokens == 2 * 1100
    assert ledger.job(TEAM_ID, "job-1").cost == worst.cost
    assert ledger.model(TEAM_ID, "gpt-4o").cost == reserve.worst_cost(100, 1000, routes[0].pricing)
    assert ledger.model(TEAM_ID, "gpt-4o-mini").calls == 2
    assert ledger.in_flight == 2

    assert ledger.release(first)
    assert not ledger.release(first)  # a second release does nothing
    assert ledger.team(TEAM_ID).cost == worst.cost
    assert ledger.model(TEAM_ID, "gpt-4o").calls == 0
    assert ledger.release(second)
    assert ledger.in_flight == 0
    assert ledger.team(TEAM_ID).cost == 0
    assert changes[-1] == (TEAM_ID, Decimal(0))


def test_a_call_without_a_ceiling_gets_the_default_sent_upstream(
    gateway: Any, fake: FakeUpstream
) -> None:
    assert post(gateway.url, CHAT).status_code == 200
    assert fake.calls[-1].body["max_completion_tokens"] == reserve.DEFAULT_MAX_OUTPUT_TOKENS

    assert post(gateway.url, {**CHAT, "max_tokens": 7}).status_code == 200
    assert fake.calls[-1].body["max_tokens"] == 7
    assert "max_completion_tokens" not in fake.calls[-1].body
    settled(gateway)
    assert settlements(gateway, "metered") == 2


def test_the_policy_default_ceiling_is_reserved_and_sent(
    start_gateway: StartGateway, upstream: ServerThread, fake: FakeUpstream
) -> None:
    config = sample_config(upstream.url)
    config.policies[0].default_max_output_tokens = 64
    gateway = start_gateway(config)

    assert post(gateway.url, CHAT).status_code == 200
    assert fake.calls[-1].body["max_completion_tokens"] == 64
    assert post(gateway.url, {"model": "gpt-4o", "input": "hi"}, "/v1/responses").status_code == 200
    assert fake.calls[-1].body["max_output_tokens"] == 64
    settled(gateway)


def test_anthropic_calls_are_reserved_at_their_own_max_tokens(
    gateway: Any, fake: FakeUpstream
) -> None:
    assert post(gateway.url, MESSAGE, "/v1/messages").status_code == 200
    assert fake.calls[-1].body["max_tokens"] == MESSAGE["max_tokens"]
    settled(gateway)


def test_refusal_names_worst_case_and_what_is_left_and_costs_nothing(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    now = datetime.now(UTC)
    spend = SpendState(
        spent_usd=Decimal("99.999"), period_start=now - timedelta(1), period_end=now + timedelta(1)
    )
    gateway = start_gateway(team={"spend": spend})

    response = post(gateway.url, {**CHAT, "max_tokens": 100_000})

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == reserve.REFUSAL
    assert error["type"] == "rate_limit_error"
    assert "0.001 USD left" in error["message"]
    assert "max_tokens lower" in error["message"]
    assert response.headers["x-should-retry"] == "false"  # would not fit with nothing in flight
    assert fake.calls == []
    last = records(gateway).records[-1]
    assert (last.outcome, last.reason, last.cost_usd) == (Outcome.REFUSED, reserve.REFUSAL, 0)
    assert (
        gateway.gateway.metrics.reservations_refused.labels(TEAM_ID, "team_cap")._value.get() == 1
    )
    # A smaller ceiling fits.
    assert post(gateway.url, {**CHAT, "max_tokens": 10}).status_code == 200
    settled(gateway)


def test_model_cap_refuses_the_routed_model(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    gateway = start_gateway(
        team={"model_caps": [ModelCap(model="gpt-4o", max_cost_usd=Decimal("0.001"))]}
    )

    response = post(gateway.url, {**CHAT, "max_tokens": 1000}, headers=CODE_REVIEW)

    assert response.status_code == 429
    assert response.json()["error"]["code"] == reserve.REFUSAL
    assert response.headers["x-costwarden-reservation-limit"] == "model_cost"
    assert "model gpt-4o" in response.json()["error"]["message"]
    assert fake.calls == []
    # Other models are not limited by gpt-4o's cap.
    assert post(gateway.url, {**CHAT, "max_tokens": 1000}).status_code == 200
    settled(gateway)


def test_model_cap_counts_the_operators_per_model_spend(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    now = datetime.now(UTC)
    spend = SpendState(
        spent_usd=Decimal(5),
        period_start=now - timedelta(1),
        period_end=now + timedelta(1),
        models=[ModelSpend(model="gpt-4o", spent_usd=Decimal(5), tokens=1000)],
    )
    cap = [ModelCap(model="gpt-4o", max_cost_usd=Decimal("5.001"))]
    gateway = start_gateway(team={"model_caps": cap, "spend": spend})

    small = post(gateway.url, {**CHAT, "max_tokens": 10}, headers=CODE_REVIEW)
    large = post(gateway.url, {**CHAT, "max_tokens": 1000}, headers=CODE_REVIEW)

    assert small.status_code == 200
    assert large.status_code == 429
    assert "5 USD spent" in large.json()["error"]["message"]
    settled(gateway)


def test_a_fallback_over_its_model_cap_is_dropped(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    cap = [ModelCap(model="gpt-4o-mini", max_tokens=10)]
    gateway = start_gateway(team={"model_caps": cap})
    fake.script("gpt-4o", "500")

    response = post(gateway.url, {**CHAT, "max_tokens": 100}, headers=CODE_REVIEW)

    assert response.status_code == 500  # gpt-4o's own error: no fallback left to try
    assert [c.model for c in fake.calls] == ["gpt-4o"]
    record = records(gateway).records[-1]
    assert record.served_model == "gpt-4o"
    settled(gateway)
    assert settlements(gateway, "nothing") == 1


def test_model_cap_counts_what_this_gateway_metered_on_the_model(
    start_gateway: StartGateway, fake: FakeUpstream
) -> None:
    # Room for one call's worst case on gpt-4o, not two: the first call's metered tokens
    # count against the cap.
    body = {**CHAT, "max_tokens": 20}
    bound = reserve.prompt_token_bound(orjson.dumps(body)) + 20
    gateway = start_gateway(team={"model_caps": [ModelCap(model="gpt-4o", max_tokens=bound + 5)]})

    assert post(gateway.url, body, headers=CODE_REVIEW).status_code == 200
    refused = post(gateway.url, body, headers=CODE_REVIEW)
    assert refused.status_code == 429
    assert refused.headers["x-costwarden-reservation-limit"] == "model_tokens"
    settled(gateway)


@pytest.mark.parametrize(
    ("fault", "stream"),
    [("", False), ("", True), ("500", False), ("malformed", False), ("no-usage", True)],
)
def test_no_hold_leaks_on_any_path(
    gateway: Any, fake: FakeUpstream, fault: str, stream: bool
) -> None:
    if fault:
        fake.script("gpt-4o-mini", fault)
    post(gateway.url, {**CHAT, "stream": stream})
    wait_for(lambda: records(gateway).records, what="the record")
    settled(gateway)


def test_no_hold_leaks_on_embeddings_anthropic_and_responses(
    gateway: Any, fake: FakeUpstream
) -> None:
    embed = {"model": "text-embedding-3-small", "input": "hello"}
    assert post(gateway.url, embed, "/v1/embeddings").status_code == 200
    assert post(gateway.url, {**MESSAGE, "stream": True}, "/v1/messages").status_code == 200
    responses = {"model": "gpt-4o", "input": "hi", "stream": True}
    assert post(gateway.url, responses, "/v1/responses").status_code == 200
    wait_for(lambda: len(records(gateway).records) == 3, what="three records")
    settled(gateway)
    assert settlements(gateway, "metered") == 3


def test_stream_without_usage_is_charged_its_reservation(gateway: Any, fake: FakeUpstream) -> None:
    fake.script("gpt-4o-mini", "no-usage")
    body = {**CHAT, "stream": True, "max_tokens": 300}

    post(gateway.url, body)

    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    prompt = reserve.prompt_token_bound(orjson.dumps(body))
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    assert record.usage_reported
    assert (record.tokens.input, record.tokens.output) == (prompt, 300)
    pricing = model("gpt-4o-mini", "http://x").pricing
    assert record.cost_usd == reserve.worst_cost(prompt, 300, pricing)
    assert "charged_reservation" in record.reason
    settled(gateway)
    assert settlements(gateway, "reservation") == 1


def test_client_gone_before_the_usage_came_is_charged_its_reservation(
    gateway: Any, fake: FakeUpstream
) -> None:
    # The usage-less stream is slow; the client reads one chunk and hangs up.
    fake.script("gpt-4o-mini", "no-usage")
    fake.chunk_delay = 0.05
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response,
    ):
        next(response.iter_raw())
    record = wait_for(lambda: records(gateway).records[-1:], what="a record")[0]

    assert record.outcome is Outcome.CLIENT_DISCONNECTED
    assert record.cost_usd > 0
    assert record.tokens.output == reserve.DEFAULT_MAX_OUTPUT_TOKENS
    settled(gateway)


def test_reservation_off_holds_nothing(gateway: Any, fake: FakeUpstream) -> None:
    gateway.gateway.reserving = False
    assert post(gateway.url, CHAT).status_code == 200
    assert "max_completion_tokens" not in fake.calls[-1].body
    assert settlements(gateway, "metered") == 0


class _Payload:
    """Just enough of aiohttp's StreamReader for BaseRequest.read()."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def readany(self) -> bytes:
        data, self._data = self._data, b""
        return data

    def set_read_chunk_size(self, size: int) -> None:
        return None


class _HangingUpstream:
    """An upstream that takes the call and never answers."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def post(self, url: str, headers: Any, body: bytes) -> Any:
        self.sent.set()
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None


def test_a_call_cancelled_after_it_was_sent_is_charged_its_reservation(tmp_path: Any) -> None:
    upstream = _HangingUpstream()
    sink = MemorySink()
    store = ConfigStore(None)
    store.set(sample_config("http://127.0.0.1:9"))
    gateway = Gateway(
        config=store,
        identifier=sidecar_identity(),
        upstream=upstream,
        sink=sink,
        credentials=Credentials(write_credentials(tmp_path / "credentials")),
    )
    body = {**CHAT, "max_tokens": 40}

    async def scenario() -> None:
        request = make_mocked_request(
            "POST",
            "/v1/chat/completions",
            headers={"Content-Type": "application/json"},
            payload=_Payload(orjson.dumps(body)),
        )
        task = asyncio.create_task(gateway.handle(request, OPENAI, Endpoint.CHAT_COMPLETIONS))
        sent = asyncio.create_task(upstream.sent.wait())
        await asyncio.wait({task, sent}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert sent.done(), sink.records
        assert gateway.reservations.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())

    assert gateway.reservations.in_flight == 0
    record = sink.records[-1]
    prompt = reserve.prompt_token_bound(orjson.dumps(body))
    assert (record.tokens.input, record.tokens.output) == (prompt, 40)
    assert record.cost_usd == reserve.worst_cost(prompt, 40, model("gpt-4o-mini", "x").pricing)
    assert record.reason == "cancelled; charged_reservation"
