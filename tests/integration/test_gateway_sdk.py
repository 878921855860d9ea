"""The official openai and anthropic SDKs against the gateway, on real sockets.

Done-when of issue #3: plain, streaming and tool-calling requests complete, and the
metered tokens and cost equal what the upstream reported, exactly, in every case. No
cluster is needed here except for the TokenReview test at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Outcome, UsageRecord
from costwarden.gateway.identity import SharedIdentifier
from costwarden.gateway.sinks import MemorySink
from costwarden.testing.gateway import (
    NAMESPACE,
    PROVIDER_KEY,
    TEAM_ID,
    GatewayThread,
    sample_config,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread

# USD per 1M tokens: input, output, cached input, cache write (prices.yaml / sample config).
PRICES = {
    "gpt-4o-mini": ("0.15", "0.60", "0.075", "0.15"),
    "gpt-4o": ("2.50", "10.00", "1.25", "2.50"),
    "text-embedding-3-small": ("0.02", "0", "0.02", "0.02"),
    "claude-sonnet": ("3.00", "15.00", "0.30", "3.75"),
}
TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the weather like in Paris today?"},
]
CLAUDE = "claude-fake-sonnet"


def expected_cost(model: str, tokens: TokenUsage) -> Decimal:
    inp, out, cached, write = (Decimal(p) for p in PRICES[model])
    total = (
        tokens.input * inp
        + tokens.output * out
        + tokens.cached_input * cached
        + tokens.cache_creation * write
    )
    return total / Decimal(1_000_000)


def openai_tokens(usage: dict[str, Any]) -> TokenUsage:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return TokenUsage(
        input=usage["prompt_tokens"] - cached,
        output=usage.get("completion_tokens", 0),
        cached_input=cached,
    )


def anthropic_tokens(usage: Any) -> TokenUsage:
    return TokenUsage(
        input=usage.input_tokens,
        output=usage.output_tokens,
        cached_input=usage.cache_read_input_tokens or 0,
        cache_creation=usage.cache_creation_input_tokens or 0,
    )


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def gateway(fake: FakeUpstream, tmp_path: Path) -> Iterator[GatewayThread]:
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials")
        with GatewayThread(sample_config(upstream.url), credentials_dir=credentials) as gw:
            yield gw


@pytest.fixture
def oai(gateway: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-own-key", max_retries=0)


@pytest.fixture
def claude(gateway: GatewayThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="sk-client-own-key", max_retries=0)


def only_record(gateway: GatewayThread) -> UsageRecord:
    """The call's record. A stream's record is written just after its last byte is sent,
    so the client may finish first: poll with a deadline."""
    sink = gateway.sink
    assert isinstance(sink, MemorySink)
    deadline = time.monotonic() + 5
    while not sink.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == 1
    return sink.records[0]


def assert_metered(record: UsageRecord, model: str, reported: TokenUsage) -> None:
    assert record.outcome is Outcome.OK
    assert record.served_model == model
    assert record.usage_reported
    assert record.tokens == reported
    assert record.cost_usd == expected_cost(model, reported)
    assert record.cost_usd > 0
    assert (record.team, record.namespace, record.job) == (TEAM_ID, NAMESPACE, "agent-1")


def test_openai_plain_chat(gateway: GatewayThread, oai: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    completion = raw.parse()

    assert completion.choices[0].message.content
    assert raw.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert raw.headers["x-costwarden-rule"] == "default"
    assert raw.headers["x-costwarden-config-revision"] == "rev-1"
    assert "default model" in raw.headers["x-costwarden-reason"]
    assert completion.usage is not None
    reported = openai_tokens(completion.usage.model_dump())
    assert reported.cached_input > 0
    assert_metered(only_record(gateway), "gpt-4o-mini", reported)
    # The provider key goes upstream; the client's own key never does.
    assert fake.calls[0].authorization == f"Bearer {PROVIDER_KEY}"


def test_openai_stream_with_usage_requested(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("This is a deterministic reply")
    assert_metered(
        only_record(gateway), "gpt-4o-mini", openai_tokens(usage_chunks[0].usage.model_dump())
    )
    assert only_record(gateway).streaming


def test_openai_stream_without_usage_is_still_metered(
    gateway: GatewayThread, oai: openai.OpenAI, fake: FakeUpstream
) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))

    # The client did not ask for usage: it never sees the usage-only chunk ...
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    # ... but the gateway asked upstream for it and metered exactly that.
    assert fake.calls[0].body["stream_options"] == {"include_usage": True}
    assert fake.calls[0].usage is not None
    assert_metered(only_record(gateway), "gpt-4o-mini", openai_tokens(fake.calls[0].usage))


def test_openai_tool_call(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS_OPENAI)

    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"query": "weather in Paris"}
    assert completion.usage is not None
    assert_metered(
        only_record(gateway), "gpt-4o-mini", openai_tokens(completion.usage.model_dump())
    )


def test_openai_streamed_tool_call(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=TOOLS_OPENAI,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    arguments = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in c.choices[0].delta.tool_calls or []
    )
    assert json.loads(arguments) == {"query": "weather in Paris"}
    usage = next(c.usage for c in chunks if c.usage is not None)
    assert_metered(only_record(gateway), "gpt-4o-mini", openai_tokens(usage.model_dump()))


def test_openai_embeddings(gateway: GatewayThread, oai: openai.OpenAI) -> None:
    result = oai.embeddings.create(model="text-embedding-3-small", input=["one two three", "four"])

    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
    reported = TokenUsage(input=result.usage.prompt_tokens)
    assert reported.input == 4
    record = only_record(gateway)
    assert_metered(record, "text-embedding-3-small", reported)
    assert record.endpoint.value == "embeddings"


def test_openai_models_lists_the_policy(oai: openai.OpenAI) -> None:
    names = {m.id for m in oai.models.list().data}

    assert {"gpt-4o", "gpt-4o-mini", "claude-sonnet", "local-llama"} <= names


def test_anthropic_plain_message(
    gateway: GatewayThread, claude: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    raw = claude.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "Hello there"}]
    )
    message = raw.parse()

    assert message.content[0].type == "text"
    assert raw.headers["x-costwarden-model"] == "claude-sonnet"
    assert raw.headers["x-costwarden-rule"] == "claude"
    reported = anthropic_tokens(message.usage)
    assert reported.cached_input > 0
    assert reported.cache_creation > 0
    assert_metered(only_record(gateway), "claude-sonnet", reported)
    assert fake.calls[0].api_key == PROVIDER_KEY
    assert fake.calls[0].authorization == ""


def test_anthropic_streaming_message(gateway: GatewayThread, claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=CLAUDE, max_tokens=100, messages=[{"role": "user", "content": "Hello there"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text.startswith("This is a deterministic reply")
    reported = anthropic_tokens(final.usage)
    assert reported.output == len(text.split())
    assert_metered(only_record(gateway), "claude-sonnet", reported)


def test_anthropic_tool_use(gateway: GatewayThread, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CLAUDE, max_tokens=100, tools=TOOLS_ANTHROPIC,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )  # fmt: skip

    block = message.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert message.stop_reason == "tool_use"
    assert_metered(only_record(gateway), "claude-sonnet", anthropic_tokens(message.usage))


def test_anthropic_streamed_tool_use(gateway: GatewayThread, claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=CLAUDE, max_tokens=100, tools=TOOLS_ANTHROPIC,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:  # fmt: skip
        final = stream.get_final_message()

    block = final.content[0]
    assert block.type == "tool_use"
    assert block.input == {"query": "weather in Paris"}
    assert_metered(only_record(gateway), "claude-sonnet", anthropic_tokens(final.usage))


def test_sdk_refusal_is_a_typed_error(fake: FakeUpstream, tmp_path: Path) -> None:
    """An unattributed caller: the SDK raises AuthenticationError with costwarden's code."""
    with (
        ServerThread(fake.app) as upstream,
        GatewayThread(sample_config(upstream.url), identifier=SharedIdentifier(None, None)) as gw,
    ):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as raised:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert raised.value.code == "unattributed_caller"
    assert fake.calls == []


# --- shared mode with Kubernetes service-account tokens (needs the control plane) ---------


def test_service_account_token_identifies_pod_job_and_team(
    control_plane: Any, kubeconfig: str, namespace: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    from costwarden.gateway.tokenreview import TokenReviewVerifier, api_client

    kubectl = control_plane.kubectl
    kubectl("create", "serviceaccount", "agent", "-n", namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-pod", "namespace": namespace,
                     "labels": {"batch.kubernetes.io/job-name": "nightly-agent"}},
        "spec": {"serviceAccountName": "agent",
                 "containers": [{"name": "c", "image": "busybox"}]},
    }  # fmt: skip
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod))
    kubectl("apply", "-f", str(manifest))
    token = kubectl(
        "create", "token", "agent", "-n", namespace, "--audience", "costwarden.io/gateway",
        "--bound-object-kind", "Pod", "--bound-object-name", "agent-pod",
    ).stdout.strip()  # fmt: skip

    with ServerThread(fake.app) as upstream:
        config = sample_config(upstream.url, namespaces=[namespace])
        verifier = TokenReviewVerifier(api_client(kubeconfig))
        identifier = SharedIdentifier(None, verifier)
        keys = write_credentials(tmp_path / "credentials")
        with GatewayThread(config, identifier=identifier, credentials_dir=keys) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            forged = openai.OpenAI(base_url=gw.url + "/v1", api_key=token[:-4] + "AAAA",
                                   max_retries=0)  # fmt: skip
            with pytest.raises(openai.AuthenticationError):
                forged.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            record = gw.sink.records[0]  # type: ignore[attr-defined]

    assert (record.team, record.namespace, record.pod, record.job, record.caller) == (
        TEAM_ID,
        namespace,
        "agent-pod",
        "nightly-agent",
        "token",
    )
    assert hashlib.sha256(token.encode()).hexdigest() not in record.model_dump_json()
    assert token not in record.model_dump_json()
