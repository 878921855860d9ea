"""The upstream misbehaves under load: it answers beyond the clients' timeouts, resets
connections before and in the middle of its answers, and answers bytes that are not HTTP
or a 200 that is not JSON, at random (seeded) among normal answers, while agents call
through the real gateway process (plain and streamed). Every call is either charged
exactly what the upstream bills or answered with an error and charged nothing: per
message, a call the client got is one the upstream billed, a 502 is one it did not; and
the books equal the upstream's bill, its count of billed calls and the calls made."""

from __future__ import annotations

import threading
import time
from collections import Counter
from decimal import Decimal

import openai
import pytest

from costwarden.testing.upstream import FakeUpstream
from tests.faults.faults import BUDGET, spent_exact, summary
from tests.support.polling import wait_for
from tests.support.stack import MODEL, Stack, job_manifest, upstream_cost

MIX = {
    "slow-answer": 0.04,
    "reset-before-answer": 0.05,
    "reset-mid-answer": 0.05,
    "garbage": 0.05,
    "malformed": 0.03,
}
CLIENT_TIMEOUT = 1.0
SLOW_ANSWER = 1.6


class Caller(threading.Thread):
    """An agent that calls until stopped (plain or streamed), with a client timeout and
    no retries, and notes each message's outcome: ok, timeout or the error code."""

    def __init__(self, client: openai.OpenAI, name: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.client, self.name, self.stream = client, name, stream
        self.stop = threading.Event()
        self.outcomes: dict[str, str] = {}

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            message = f"{self.name} step {n} now."
            self.outcomes[message] = self._call(message)

    def _call(self, message: str) -> str:
        messages = [{"role": "user", "content": message}]
        try:
            if self.stream:
                chunks = self.client.chat.completions.create(
                    model=MODEL, messages=messages,  # type: ignore[arg-type]
                    stream=True, stream_options={"include_usage": True},
                )  # fmt: skip
                usage = [c.usage for c in chunks if c.usage is not None]
                return "ok" if usage else "no-usage"
            self.client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
            return "ok"
        except openai.APITimeoutError:
            return "timeout"
        except openai.APIStatusError as error:
            return f"{error.status_code} {getattr(error, 'code', '')}"
        except openai.APIError as error:
            return f"error {type(error).__name__}: {error}"


def _billed_messages(upstream: FakeUpstream) -> Counter[str]:
    billed: Counter[str] = Counter()
    for call in list(upstream.calls):
        if call.usage is not None:
            billed[call.body["messages"][-1]["content"]] += 1
    return billed


def _hostile_upstream_under_load(stack: Stack, namespace: str, seconds: float) -> None:
    team = stack.team(namespace, BUDGET, "100")
    stack.create(namespace, job_manifest("agent", BUDGET))
    callers = []
    for i, stream in enumerate((False, False, True, True)):
        key = stack.gateway.agent(team, namespace, "agent").api_key
        client = openai.OpenAI(
            base_url=stack.gateway.url + "/v1", api_key=key, max_retries=0, timeout=CLIENT_TIMEOUT
        )
        callers.append(Caller(client, f"agent-{i}", stream))
    stack.upstream.slow_answer_seconds = SLOW_ANSWER
    stack.upstream.mix = dict(MIX)
    started = time.monotonic()
    for caller in callers:
        caller.start()
    wait_for(lambda: time.monotonic() - started >= seconds, timeout=seconds + 5, interval=0.5,
             what=f"{seconds}s of load on a misbehaving upstream")  # fmt: skip
    for caller in callers:
        caller.stop.set()
    for caller in callers:
        caller.join(30)
    outcomes = {m: o for c in callers for m, o in c.outcomes.items()}
    # A slow answer the client gave up on is still being generated, and billed when it
    # ends (at most SLOW_ANSWER after its call began): wait for it, then for the books.
    stopped = time.monotonic()
    wait_for(lambda: time.monotonic() - stopped > SLOW_ANSWER, timeout=SLOW_ANSWER + 5,
             interval=0.2, what="the last slow answers generated")  # fmt: skip
    wait_for(lambda: _settled(stack, namespace), timeout=120, interval=0.5,
             what="every call's usage applied: spend == the upstream's bill")  # fmt: skip
    billed = _billed_messages(stack.upstream)

    # Per message: what the client got agrees with what the upstream billed.
    unexpected = {m: o for m, o in outcomes.items() if o not in ("ok", "timeout")
                  and not o.startswith("502 ")}  # fmt: skip
    assert not unexpected, f"calls ended neither served, timed out nor 502: {unexpected}"
    assert all(billed[m] <= 1 for m in outcomes), "a message billed twice"
    served_unbilled = [m for m, o in outcomes.items() if o == "ok" and not billed[m]]
    assert not served_unbilled, f"served but not billed by the upstream: {served_unbilled[:5]}"
    errors_billed = [m for m, o in outcomes.items() if o.startswith("502 ") and billed[m]]
    assert not errors_billed, f"a 502 the upstream billed: {errors_billed[:5]}"
    assert set(billed) <= set(outcomes), "the upstream billed a message nobody sent"

    # The books: spend equals the bill exactly; the calls charged equal the calls billed;
    # every call made is one record (nothing lost, nothing counted twice).
    status = stack.status(namespace, BUDGET)
    expected = upstream_cost(stack.upstream)
    assert Decimal(status["spentExactUSD"]) == expected
    charged = sum(m.get("requests", 0) for m in status.get("byModel") or [])
    assert charged == sum(billed.values())
    assert int(status["ingestion"]["records"]) == len(outcomes)
    kinds = Counter(c.fault or "normal" for c in stack.upstream.calls)
    results = Counter(o.split(" ")[-1] for o in outcomes.values())
    print(summary(
        fault="hostile upstream under load", seconds=seconds, calls=len(outcomes),
        upstream_calls=len(stack.upstream.calls), billed=sum(billed.values()),
        upstream_faults=dict(kinds), client_outcomes=dict(results), spent=expected,
    ))  # fmt: skip


def _settled(stack: Stack, namespace: str) -> bool:
    try:
        return spent_exact(stack, namespace) == upstream_cost(stack.upstream)
    except Exception:  # a status read that failed: poll again
        return False


def test_slow_resetting_and_garbage_upstream_under_load_charges_exactly_the_bill(
    stack: Stack, namespace: str
):
    _hostile_upstream_under_load(stack, namespace, seconds=10)


@pytest.mark.faults_long
def test_slow_resetting_and_garbage_upstream_under_long_load_charges_exactly_the_bill(
    stack: Stack, namespace: str
):
    _hostile_upstream_under_load(stack, namespace, seconds=120)
