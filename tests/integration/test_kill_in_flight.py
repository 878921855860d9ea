"""kill -9 with calls in flight (issue #12): a real gateway process, ledger-only, the official
openai and anthropic SDKs as clients and a slow upstream. Calls the kill cuts off were sent upstream
(the provider bills them) and never answered; after the restart on the same ledger each is
in the ledger exactly once, charged exactly its reservation, and nothing else is charged:
spend in the ledger == the settled calls (the upstream's own usage, priced) + the
reservations of the interrupted ones. Before the hold journal they were metered by nobody."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.teambudget import TokenUsage
from costwarden.gateway.holds import INTERRUPTED_REASON, journal_path, segments
from costwarden.policy import reservation as reserve
from costwarden.policy.pricing import call_cost
from costwarden.ports import free_port
from costwarden.testing.gateway import (
    NAMESPACE,
    PROVIDER_KEY,
    TEAM_ID,
    sample_config,
    write_credentials,
)
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.polling import wait_for

KEY = "cw-kill-in-flight-test-key"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 700
SETTLED = 12
IN_FLIGHT = 8
LATENCY = 8.0  # seconds the upstream holds the calls the kill cuts off


def anthropic_body(label: str) -> dict[str, Any]:
    return {
        "model": "claude-fake-sonnet",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"call {label}"}],
    }


def body(label: str) -> dict[str, Any]:
    # Distinct prompts of one size (identical ones would trip loop detection).
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"call {label}"}],
        "max_tokens": MAX_TOKENS,
    }


class GatewayProcess:
    def __init__(self, tmp_path: Path, upstream_url: str) -> None:
        self.dir = tmp_path
        config = sample_config(upstream_url)
        self.models = config.policies[0].models
        self.mini = next(m for m in self.models if m.name == MODEL)
        self.config = tmp_path / "config.json"
        self.config.write_text(config.model_dump_json(by_alias=True))
        self.keys = tmp_path / "keys.yaml"
        entry = json.dumps({"team": TEAM_ID, "namespace": NAMESPACE, "job": "agent"})
        self.keys.write_text(f"{hashlib.sha256(KEY.encode()).hexdigest()}: {entry}\n")
        self.credentials = write_credentials(tmp_path / "credentials")
        self.ledger = tmp_path / "ledger.jsonl"
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "costwarden", "gateway", "--config", str(self.config),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--mode", "shared",
                "--api-keys-file", str(self.keys), "--credentials-dir", str(self.credentials),
                "--ledger", str(self.ledger), "--ledger-fsync", "batch",
                "--replica-id", "gw-kill", "--log-level", "WARNING",
            ],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        wait_for(self._ready, timeout=30, what="gateway ready")

    def _ready(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(30)

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        prefix = f'{name}{{team="{TEAM_ID}"}} '
        return sum(
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        )

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=KEY, max_retries=0, timeout=60)

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.ledger.read_bytes().splitlines() if line]


def test_calls_in_flight_at_a_kill_are_charged_their_reservation_once(tmp_path: Path) -> None:
    fake = FakeUpstream()
    with ServerThread(fake.app) as upstream:
        gateway = GatewayProcess(tmp_path, upstream.url)
        gateway.start()
        try:
            _run(gateway, fake)
        finally:
            if gateway.process is not None and gateway.process.poll() is None:
                gateway.signal(signal.SIGTERM)


def _run(gateway: GatewayProcess, fake: FakeUpstream) -> None:
    sdk = gateway.client()
    for i in range(SETTLED):
        answer = sdk.chat.completions.create(**body(f"settled {i:03d}"))
        assert answer.usage is not None
    # The upstream's own bill of the answered calls, priced at the policy's prices.
    settled_bill = sum((_price(c.usage, gateway.mini) for c in list(fake.calls)), Decimal(0))
    assert len(fake.calls) == SETTLED

    # Every call from now on stays upstream LATENCY seconds: the kill comes first. In
    # flight: plain chat, streamed chat and an Anthropic message (whose reservation is
    # priced at Claude's cache-write rate, its dearest input rate).
    fake.latency = LATENCY
    claude = next(m for m in gateway.models if m.name == "claude-sonnet")
    flights = [("chat", f"flight {i:03d}") for i in range(IN_FLIGHT - 3)]
    flights += [("stream", "flight s01"), ("stream", "flight s02"), ("messages", "flight m01")]
    expected = {label: _reservation(kind, label, gateway.mini, claude) for kind, label in flights}
    failures: list[BaseException] = []

    def call(kind: str, label: str) -> None:
        try:
            if kind == "messages":
                gateway.anthropic().messages.create(**anthropic_body(label))
            else:
                sdk = gateway.client()
                if kind == "stream":
                    list(sdk.chat.completions.create(**body(label), stream=True))
                else:
                    sdk.chat.completions.create(**body(label))
        except (openai.APIConnectionError, anthropic.APIConnectionError) as exc:
            failures.append(exc)  # the gateway died under it

    callers = [threading.Thread(target=call, args=f, daemon=True) for f in flights]
    for caller in callers:
        caller.start()
    held = float(sum(expected.values(), Decimal(0)))
    wait_for(lambda: gateway.metric("costwarden_gateway_reserved_usd") == held, timeout=30,
             what=f"{IN_FLIGHT} calls reserved and in flight")  # fmt: skip
    # ... and sent: the provider has them all (a call killed before its request left is
    # charged its reservation too, but the provider would not bill it).
    wait_for(lambda: fake.waiting == IN_FLIGHT, timeout=30, what="the upstream has every call")
    gateway.signal(signal.SIGKILL)
    for caller in callers:
        caller.join(30)
    assert len(failures) == IN_FLIGHT  # no caller got an answer
    before_restart = gateway.records()
    assert len(before_restart) == SETTLED  # the interrupted calls are in no record yet

    fake.latency = 0.0
    gateway.start()  # same ledger: recovery runs before it serves

    records = gateway.records()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))  # each call once
    ok = [r for r in records if r["outcome"] == "OK"]
    interrupted = [r for r in records if r["reason"] == INTERRUPTED_REASON]
    assert len(ok) == SETTLED
    assert len(interrupted) == IN_FLIGHT
    assert len(records) == SETTLED + IN_FLIGHT
    charged: dict[tuple[str, bool], list[Decimal]] = {}
    for record in interrupted:
        assert record["usageReported"] is True
        assert record["team"] == TEAM_ID
        route = claude if record["servedModel"] == claude.name else gateway.mini
        tokens = TokenUsage.model_validate(record["tokens"])
        # Exactly the reservation, also as the operator recomputes it (tokens x prices).
        assert call_cost(tokens, route.pricing) == Decimal(record["costUSD"])
        key = (record["servedModel"], record["streaming"])
        charged.setdefault(key, []).append(Decimal(record["costUSD"]))
    by_kind = {"chat": (MODEL, False), "stream": (MODEL, True), "messages": (claude.name, False)}
    wanted: dict[tuple[str, bool], list[Decimal]] = {}
    for kind, label in flights:
        wanted.setdefault(by_kind[kind], []).append(expected[label])
    assert {k: sorted(v) for k, v in charged.items()} == {k: sorted(v) for k, v in wanted.items()}
    claude_record = next(r for r in interrupted if r["servedModel"] == claude.name)
    # Input at the dearest input rate, the 1-hour cache write (2x input for Claude).
    assert claude_record["tokens"]["cacheCreation1h"] > 0
    delivered = sum((Decimal(r["costUSD"]) for r in records), Decimal(0))
    assert sum((Decimal(r["costUSD"]) for r in ok), Decimal(0)) == settled_bill
    assert delivered == settled_bill + sum(expected.values(), Decimal(0))
    assert gateway.metric("costwarden_gateway_interrupted_calls_total") == IN_FLIGHT
    # Recovered, then a new empty segment started and the old ones removed.
    (segment,) = segments(journal_path(gateway.ledger))
    assert segment.read_bytes() == b""

    # The provider did bill them: each, once its upstream sleep ends, reported usage that
    # the reservation covers (charged at least what was billed, never $0).
    wait_for(lambda: len(fake.calls) == SETTLED + IN_FLIGHT, timeout=LATENCY + 30,
             what="the upstream finishing the calls it was sent")  # fmt: skip
    for served in list(fake.calls)[SETTLED:]:
        label = _label(served.body)
        route = claude if served.model == claude.upstream_model else gateway.mini
        assert _price(served.usage, route) <= expected[label]

    # Restarting again (after a clean stop, and after another kill) charges nothing more.
    gateway.signal(signal.SIGTERM)
    gateway.start()
    gateway.signal(signal.SIGKILL)
    gateway.start()
    assert gateway.records() == records
    answer = gateway.client().chat.completions.create(**body("after"))
    assert answer.usage is not None

    log = gateway.log.read_text()
    assert f"{IN_FLIGHT} calls interrupted by the previous stop charged at their reservation" in log
    assert KEY not in log
    assert PROVIDER_KEY not in log


def _price(usage: dict[str, Any] | None, route: ModelRoute) -> Decimal:
    """The upstream's own usage (OpenAI or Anthropic shape), priced at the route's prices."""
    assert usage is not None
    if "input_tokens" in usage:  # Anthropic
        tokens = TokenUsage(
            input=usage["input_tokens"],
            output=usage["output_tokens"],
            cached_input=usage.get("cache_read_input_tokens") or 0,
            cache_creation=usage.get("cache_creation_input_tokens") or 0,
        )
        return call_cost(tokens, route.pricing)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    tokens = TokenUsage(
        input=usage["prompt_tokens"] - cached,
        output=usage["completion_tokens"],
        cached_input=cached,
    )
    return call_cost(tokens, route.pricing)


def _reservation(kind: str, label: str, mini: ModelRoute, claude: ModelRoute) -> Decimal:
    """The worst case of one call, from the body the SDK sends (compact JSON)."""
    if kind == "messages":
        raw, route = orjson.dumps(anthropic_body(label)), claude
    else:
        sent = body(label) | ({"stream": True} if kind == "stream" else {})
        raw, route = orjson.dumps(sent), mini
    return reserve.worst_cost(reserve.prompt_token_bound(raw), MAX_TOKENS, route.pricing)


def _label(sent: dict[str, Any]) -> str:
    return str(sent["messages"][0]["content"]).removeprefix("call ")
