"""The OpenAI Responses API and Anthropic token counting through the gateway, with the
official SDKs on real sockets (issue #11).

Metering is checked against the usage the upstream reported, exactly (Decimal): the
Responses API's ``input_tokens`` include cached reads, ``output_tokens`` include reasoning,
and provider-run tools are priced per call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from costwarden.api.gatewayconfig import GatewayConfig, SpendState
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.gateway.forward import charged_without_usage
from costwarden.gateway.sinks import MemorySink
from costwarden.testing import answers
from costwarden.testing.gateway import (
    NAMESPACE,
    TEAM_ID,
    GatewayThread,
    model,
    sample_config,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread

# USD per 1M tokens: input, output, cached input, cache write (prices.yaml).
PRICES = {
    "gpt-4o-mini": ("0.15", "0.60", "0.075", "0.15"),
    "gpt-4o": ("2.50", "10.00", "1.25", "2.50"),
}
WEB_SEARCH_USD = Decimal("0.01")
FUNCTION_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
INPUT = "What is the weather like in Paris today?"


def expected_cost(name: str, tokens: TokenUsage, tool_calls: Decimal = Decimal(0)) -> Decimal:
    inp, out, cached, write = (Decimal(p) for p in PRICES[name])
    total = (
        tokens.input * inp
        + tokens.output * out
        + tokens.cached_input * cached
        + tokens.cache_creation * write
    )
    return total / Decimal(1_000_000) + tool_calls


def reported_tokens(usage: Any) -> TokenUsage:
    """What the upstream billed, from the SDK's ResponseUsage."""
    cached = usage.input_tokens_details.cached_tokens
    return TokenUsage(
        input=usage.input_tokens - cached, output=usage.output_tokens, cached_input=cached
    )


def with_web_search_price(config: GatewayConfig) -> GatewayConfig:
    """gpt-4o-mini bills web_search_call per call, as OpenAI does."""
    policy = config.policies[0]
    for index, route in enumerate(policy.models):
        if route.name == "gpt-4o-mini":
            pricing = route.pricing.model_copy(
                update={"tool_call_usd": {"web_search_call": WEB_SEARCH_USD}}
            )
            policy.models[index] = route.model_copy(update={"pricing": pricing})
    return config


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def gateway(fake: FakeUpstream, tmp_path: Path) -> Iterator[GatewayThread]:
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        config = with_web_search_price(sample_config(upstream.url))
        with GatewayThread(config, credentials_dir=credentials) as gw:
            yield gw


@pytest.fixture
def oai(gateway: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-own-key", max_retries=0)


def records(gateway: GatewayThread, count: int = 1) -> list[UsageRecord]:
    """The calls' records, polled with a deadline (a stream's record follows its last byte)."""
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    deadline = time.monotonic() + 5
    while len(sink.records) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == count
    return list(sink.records)


def assert_metered(record: UsageRecord, name: str, reported: TokenUsage) -> None:
    assert record.outcome is Outcome.OK
    assert record.endpoint is Endpoint.RESPONSES
    assert record.served_model == name
    assert record.usage_reported
    assert record.tokens == reported
    assert record.cost_usd == expected_cost(name, reported)
    assert record.cost_usd > 0
    assert (record.team, record.namespace, record.job) == (TEAM_ID, NAMESPACE, "agent-1")


def test_responses_create_plain_is_metered_exactly(
    gateway: GatewayThread, oai: openai.OpenAI, fake: FakeUpstream
) -> None:
    raw = oai.responses.with_raw_response.create(
        model="gpt-4o", input=INPUT, instructions="Be terse."
    )
    response = raw.parse()

    assert response.output_text.startswith("This is a deterministic reply")
    assert response.status == "completed"
    assert raw.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert fake.calls[0].path == "/v1/responses"
    assert response.usage is not None
    reported = reported_tokens(response.usage)
    assert reported.cached_input > 0
    assert_metered(records(gateway)[0], "gpt-4o-mini", reported)


def test_responses_reasoning_tokens_are_billed_as_output(
    gateway: GatewayThread, oai: openai.OpenAI
) -> None:
    response = oai.responses.create(model="gpt-4o", input=INPUT, reasoning={"effort": "low"})

    assert response.usage is not None
    reasoning = response.usage.output_tokens_details.reasoning_tokens
    assert reasoning == answers.REASONING_TOKENS
    record = records(gateway)[0]
    assert record.tokens.output == response.usage.output_tokens  # reasoning included
    assert_metered(record, "gpt-4o-mini", reported_tokens(response.usage))


def test_responses_function_tool_call_routes_by_tools_and_is_metered(
    gateway: GatewayThread, oai: openai.OpenAI
) -> None:
    response = oai.responses.create(model="gpt-4o", input=INPUT, tools=[FUNCTION_TOOL])

    call = response.output[0]
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert response.usage is not None
    assert response.usage.output_tokens == answers.TOOL_OUTPUT_TOKENS
    assert_metered(records(gateway)[0], "gpt-4o-mini", reported_tokens(response.usage))


def test_responses_task_header_routes_like_chat(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    raw = oai.responses.with_raw_response.create(
        model="gpt-4o", input=INPUT, extra_headers={"X-Costwarden-Task": "code-review"}
    )
    response = raw.parse()

    assert raw.headers["x-costwarden-rule"] == "code-review"
    assert response.usage is not None
    assert_metered(records(gateway)[0], "gpt-4o", reported_tokens(response.usage))


def test_responses_web_search_calls_are_priced_per_call(
    gateway: GatewayThread, oai: openai.OpenAI
) -> None:
    response = oai.responses.create(model="gpt-4o", input=INPUT, tools=[{"type": "web_search"}])

    assert [item.type for item in response.output] == ["web_search_call", "message"]
    assert response.usage is not None
    reported = reported_tokens(response.usage)
    record = records(gateway)[0]
    assert record.tokens == reported
    assert record.tool_calls == {"web_search_call": 1}
    assert record.cost_usd == expected_cost("gpt-4o-mini", reported, WEB_SEARCH_USD)


def test_responses_stream_is_relayed_and_metered_exactly(
    gateway: GatewayThread, oai: openai.OpenAI
) -> None:
    deltas: list[str] = []
    kinds: list[str] = []
    with oai.responses.stream(model="gpt-4o", input=INPUT, reasoning={"effort": "low"}) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()

    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "".join(deltas) == final.output_text
    assert final.usage is not None
    record = records(gateway)[0]
    assert record.streaming
    assert_metered(record, "gpt-4o-mini", reported_tokens(final.usage))


def test_responses_stream_with_web_search_is_priced(
    gateway: GatewayThread, oai: openai.OpenAI
) -> None:
    with oai.responses.stream(model="gpt-4o", input=INPUT, tools=[{"type": "web_search"}]) as s:
        kinds = [event.type for event in s]
        final = s.get_final_response()

    assert "response.web_search_call.completed" in kinds
    assert final.usage is not None
    record = records(gateway)[0]
    assert record.tool_calls == {"web_search_call": 1}
    reported = reported_tokens(final.usage)
    assert record.cost_usd == expected_cost("gpt-4o-mini", reported, WEB_SEARCH_USD)


def test_responses_incomplete_stream_is_metered(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-4o", input=INPUT, max_output_tokens=3) as stream:
        kinds = [event.type for event in stream]

    assert kinds[-1] == "response.incomplete"
    record = records(gateway)[0]
    assert record.outcome is Outcome.OK
    assert record.tokens.output == 3
    assert record.cost_usd == expected_cost("gpt-4o-mini", record.tokens)


def test_responses_failed_stream_is_an_unbilled_upstream_error(
    gateway: GatewayThread, oai: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.script("gpt-4o-mini", "failed")
    with oai.responses.stream(model="gpt-4o", input=INPUT) as stream:
        kinds = [event.type for event in stream]

    assert kinds[-1] == "response.failed"
    record = records(gateway)[0]
    assert record.outcome is Outcome.UPSTREAM_ERROR
    assert record.reason == "upstream_failed"
    assert not record.usage_reported
    assert record.cost_usd == 0


def test_responses_stream_without_closing_event_ends_in_an_error_event(
    gateway: GatewayThread, oai: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.script("gpt-4o-mini", "no-usage")
    with oai.responses.stream(model="gpt-4o", input=INPUT) as stream:
        events = list(stream)

    # The Responses API's own error event (type "error"): the SDK yields it typed.
    last = events[-1]
    assert last.type == "error"
    assert last.code == "upstream_malformed"
    assert "without valid usage" in last.message
    record = records(gateway)[0]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    # The provider bills a stream it sent: charged an estimate, never free.
    assert charged_without_usage(record.reason)
    assert record.usage_reported
    assert record.cost_usd > 0


def test_responses_hard_cap_is_a_429_in_the_responses_error_shape(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    spent = SpendState(
        spent_usd=Decimal(100), period_start=now - timedelta(days=1), period_end=now + timedelta(1)
    )
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        with GatewayThread(
            sample_config(upstream.url, spend=spent), credentials_dir=credentials
        ) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as raised:
                client.responses.create(model="gpt-4o", input=INPUT)
            record = records(gw)[0]

    assert raised.value.code == "hard_cap_reached"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert fake.calls == []
    assert record.outcome is Outcome.REFUSED
    assert record.endpoint is Endpoint.RESPONSES
    assert record.cost_usd == 0


def two_backend_config(first: str, second: str) -> GatewayConfig:
    """gpt-4o on one backend, falling back to gpt-4o-mini on another (same wire format)."""
    config = sample_config(first)
    policy = config.policies[0]
    policy.models = [m for m in policy.models if m.name != "gpt-4o-mini"]
    policy.models.append(model("gpt-4o-mini", second))
    return config


def test_previous_response_id_never_falls_back_to_another_backend(tmp_path: Path) -> None:
    holder, other = FakeUpstream(name="a"), FakeUpstream(name="b")
    with ServerThread(holder.app) as first, ServerThread(other.app) as second:
        credentials = write_credentials(tmp_path / "credentials")
        config = two_backend_config(first.url, second.url)
        with GatewayThread(config, credentials_dir=credentials) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
            task = {"X-Costwarden-Task": "code-review"}  # gpt-4o, fallback gpt-4o-mini
            first_answer = client.responses.create(model="m", input=INPUT, extra_headers=task)
            assert first_answer.id in holder.stored
            # Without a stored conversation, a failing backend falls back as usual.
            holder.script("gpt-4o", "503")
            fell_back = client.responses.with_raw_response.create(
                model="m", input=INPUT, extra_headers=task
            )
            assert fell_back.headers["x-costwarden-model"] == "gpt-4o-mini"
            # Continuing the stored response: the holder fails, and nothing else is tried.
            holder.script("gpt-4o", "503")
            with pytest.raises(openai.InternalServerError) as raised:
                client.responses.create(
                    model="m",
                    input="and tomorrow?",
                    previous_response_id=first_answer.id,
                    extra_headers=task,
                )
            continued = client.responses.create(
                model="m", input="and tomorrow?", previous_response_id=first_answer.id
            )
            last = records(gw, 4)[-1]

    assert raised.value.status_code == 503
    assert "previous_response_id" in raised.value.response.headers["x-costwarden-reason"]
    assert [c.body.get("previous_response_id") for c in other.calls] == [None]
    # Without the task header the rules route to gpt-4o-mini; the holder still serves it.
    assert continued.previous_response_id == first_answer.id
    assert last.served_model == "gpt-4o"
    assert last.outcome is Outcome.OK


def test_previous_response_id_of_a_model_gone_from_the_policy_is_refused(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        with GatewayThread(sample_config(upstream.url), credentials_dir=credentials) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
            first = client.responses.create(model="gpt-4o", input=INPUT)
            gw.gateway.holders.remember(TEAM_ID, "resp_gone", "retired-model")
            with pytest.raises(openai.APIStatusError) as raised:
                client.responses.create(
                    model="gpt-4o", input=INPUT, previous_response_id="resp_gone"
                )

    assert first.id
    assert raised.value.status_code == 409
    body = raised.value.response.json()["error"]
    assert body["code"] == "previous_response_elsewhere"
    assert "retired-model" in body["message"]
    assert len(fake.calls) == 1


# --- Anthropic token counting ---------------------------------------------------------


def test_count_tokens_goes_to_the_routed_model_and_is_never_billed(
    gateway: GatewayThread, fake: FakeUpstream
) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="sk-x", max_retries=0)
    messages: Any = [{"role": "user", "content": INPUT}]
    counted = client.messages.count_tokens(model="claude-fake-sonnet", messages=messages)
    # As Claude Code sends it: the TypeScript SDK's beta routes add ?beta=true.
    beta = client.beta.messages.count_tokens(
        model="claude-fake-sonnet",
        messages=messages,
        betas=["token-counting-2024-11-01"],
        extra_query={"beta": "true"},
    )

    expected = answers.prompt_tokens({"messages": messages})
    assert counted.input_tokens == beta.input_tokens == expected
    plain, with_beta = fake.calls
    assert plain.path == with_beta.path == "/v1/messages/count_tokens"
    assert plain.model == "claude-fake-sonnet"  # the claude rule's model, upstream id
    assert with_beta.query == "beta=true"
    assert "token-counting-2024-11-01" in with_beta.headers["anthropic-beta"]
    assert "anthropic-beta" not in plain.headers
    assert with_beta.api_key != "sk-x"  # the provider key, never the client's
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    assert sink.records == []  # no usage record: nothing billed or counted
    exposition = gateway.gateway.metrics.exposition().decode()
    assert (
        f'costwarden_gateway_count_tokens_total{{outcome="OK",team="{TEAM_ID}"}} 2.0' in exposition
    )


def test_count_tokens_is_not_counted_by_rate_limits(fake: FakeUpstream, tmp_path: Path) -> None:
    from costwarden.api.teambudget import PerJobLimits

    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        config = sample_config(upstream.url, per_job=PerJobLimits(max_requests_per_minute=1))
        with GatewayThread(config, credentials_dir=credentials) as gw:
            client = anthropic.Anthropic(base_url=gw.url, api_key="sk-x", max_retries=0)
            messages: Any = [{"role": "user", "content": INPUT}]
            for _ in range(3):
                client.messages.count_tokens(model="claude-fake-sonnet", messages=messages)
            message = client.messages.create(
                model="claude-fake-sonnet", max_tokens=50, messages=messages
            )

    assert message.usage.output_tokens > 0
    assert len(records(gw)) == 1


# --- unknown routes ---------------------------------------------------------------------


def test_unknown_route_is_a_404_in_the_callers_shape_and_counted(gateway: GatewayThread) -> None:
    openai_style = httpx.get(gateway.url + "/v1/responses/resp_123/input_items", timeout=5)
    anthropic_style = httpx.post(
        gateway.url + "/v1/messages/batches",
        json={},
        headers={"anthropic-version": "2023-06-01", "x-api-key": "k"},
        timeout=5,
    )

    assert openai_style.status_code == anthropic_style.status_code == 404
    assert openai_style.json()["error"]["type"] == "not_found_error"
    assert anthropic_style.json()["type"] == "error"
    exposition = gateway.gateway.metrics.exposition().decode()
    assert (
        'costwarden_gateway_unknown_route_total{method="GET",'
        'path="/v1/responses/{id}/input_items"} 1.0'
    ) in exposition
    assert (
        'costwarden_gateway_unknown_route_total{method="POST",path="/v1/messages/batches"} 1.0'
    ) in exposition


def test_unknown_route_labels_stay_bounded(gateway: GatewayThread) -> None:
    for n in range(100):
        httpx.get(f"{gateway.url}/v1/files/file-{n}/content", timeout=5)
        httpx.get(f"{gateway.url}/junk{n}/x{n}", timeout=5)

    exposition = gateway.gateway.metrics.exposition().decode()
    lines = [
        line
        for line in exposition.splitlines()
        if line.startswith("costwarden_gateway_unknown_route_total{")
    ]
    assert 'path="/v1/files/{id}/content"} 100.0' in "\n".join(lines)
    assert 'path="other"} 100.0' in "\n".join(lines)
    assert len(lines) == 2


def test_responses_retry_loop_and_count_tokens_do_not_feed_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Identical Responses API calls trip loop detection like chat does (429
    retry_loop_detected, a LoopSignal for the Job); token counts in between never count."""
    from costwarden.api.teambudget import LoopDetection

    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        config = sample_config(upstream.url, loop_detection=LoopDetection(identical_requests=3))
        with GatewayThread(config, credentials_dir=credentials) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-x", max_retries=0)
            claude = anthropic.Anthropic(base_url=gw.url, api_key="sk-x", max_retries=0)
            messages: Any = [{"role": "user", "content": INPUT}]
            for _ in range(5):  # identical token counts: never a loop
                claude.messages.count_tokens(model="claude-fake-sonnet", messages=messages)
            client.responses.create(model="gpt-4o", input=INPUT)
            client.responses.create(model="gpt-4o", input=INPUT)
            with pytest.raises(openai.RateLimitError) as raised:
                client.responses.create(model="gpt-4o", input=INPUT)
            sink = gw.sink
            assert isinstance(sink, MemorySink)
            signals = list(sink.loop_signals)
            refused = records(gw, 3)[-1]

    assert raised.value.code == "retry_loop_detected"
    assert refused.outcome is Outcome.REFUSED
    assert refused.job == "agent-1"
    assert [s.job for s in signals] == ["agent-1"]


def test_query_string_and_beta_headers_pass_through_on_messages(
    gateway: GatewayThread, fake: FakeUpstream
) -> None:
    """Claude Code calls /v1/messages?beta=true with anthropic-beta: both reach the model,
    and the call is metered as any other."""
    client = anthropic.Anthropic(base_url=gateway.url, api_key="sk-x", max_retries=0)
    message = client.beta.messages.create(
        model="claude-fake-sonnet",
        max_tokens=50,
        messages=[{"role": "user", "content": INPUT}],
        betas=["interleaved-thinking-2025-05-14"],
        extra_query={"beta": "true"},
    )

    sent = fake.calls[0]
    assert sent.path == "/v1/messages"
    assert sent.query == "beta=true"
    assert "interleaved-thinking-2025-05-14" in sent.headers["anthropic-beta"]
    record = records(gateway)[0]
    assert record.outcome is Outcome.OK
    assert record.tokens.output == message.usage.output_tokens


# --- Anthropic server web search: billed per use -------------------------------------

WEB_SEARCH_ANTHROPIC = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


def claude_with_search_price(config: GatewayConfig) -> GatewayConfig:
    policy = config.policies[0]
    for index, route in enumerate(policy.models):
        if route.name == "claude-sonnet":
            pricing = route.pricing.model_copy(
                update={"tool_call_usd": {"web_search_call": WEB_SEARCH_USD}}
            )
            policy.models[index] = route.model_copy(update={"pricing": pricing})
    return config


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_server_web_search_is_priced_per_use(
    fake: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        config = claude_with_search_price(sample_config(upstream.url))
        with GatewayThread(config, credentials_dir=credentials) as gw:
            client = anthropic.Anthropic(base_url=gw.url, api_key="sk-x", max_retries=0)
            kwargs: Any = {
                "model": "claude-fake-sonnet",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": INPUT}],
                "tools": [WEB_SEARCH_ANTHROPIC],
            }
            if stream:
                with client.messages.stream(**kwargs) as events:
                    message = events.get_final_message()
            else:
                message = client.messages.create(**kwargs)
            record = records(gw)[0]

    assert [b.type for b in message.content] == [
        "server_tool_use",
        "web_search_tool_result",
        "text",
    ]
    assert message.usage.server_tool_use is not None
    assert message.usage.server_tool_use.web_search_requests == 1
    usage = message.usage
    tokens = TokenUsage(
        input=usage.input_tokens,
        output=usage.output_tokens,
        cached_input=usage.cache_read_input_tokens or 0,
        cache_creation=usage.cache_creation_input_tokens or 0,
    )
    inp, out, cached, write = (Decimal(p) for p in ("3.00", "15.00", "0.30", "3.75"))
    token_cost = (
        tokens.input * inp
        + tokens.output * out
        + tokens.cached_input * cached
        + tokens.cache_creation * write
    ) / Decimal(1_000_000)
    assert record.tokens == tokens
    assert record.tool_calls == {"web_search_call": 1}
    assert record.cost_usd == token_cost + WEB_SEARCH_USD


def test_agent_loop_ends_after_a_tool_result(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    """The fake model calls the tool, then answers in text once it has the result (for
    agents driven against the fake upstream); both turns are metered."""
    first = oai.responses.create(model="gpt-4o", input=INPUT, tools=[FUNCTION_TOOL])
    call = first.output[0]
    assert call.type == "function_call"
    second = oai.responses.create(
        model="gpt-4o",
        input=[
            {"role": "user", "content": INPUT},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
        tools=[FUNCTION_TOOL],
    )

    assert second.output_text.startswith("This is a deterministic reply")
    assert [r.outcome for r in records(gateway, 2)] == [Outcome.OK, Outcome.OK]
