"""What the hold journal adds to a call: reserve + settle with and without it, same run.

    python benchmarks/holds.py [--calls 20000] [--in-flight 0] [--out results.json]

In process, no network: ``Gateway._reserve`` and the settlement, as benchmarks/reservation.py
times them, once without a journal and once with one (a real file in a temporary
directory, fsync policy batch: the hold line written before forwarding, the settlement
line after), alternating five times; CPU microseconds per call, the median of the runs
(CPU time: other processes on a shared machine only add wall time). ``--in-flight N``
keeps N calls held throughout, so compactions copy them (the cost grows with it).
Also the wall-clock p50/p99/max of one hold + settle, which includes the write(2)s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "operator"))


def run(calls: int, in_flight: int) -> dict[str, Any]:
    import orjson

    from costwarden.api.routingpolicy import Provider
    from costwarden.api.teambudget import ModelCap, PerJobLimits
    from costwarden.api.usage import Endpoint
    from costwarden.gateway.call import Call
    from costwarden.gateway.config import ConfigStore
    from costwarden.gateway.holds import HoldJournal, journal_path
    from costwarden.gateway.identity import Caller, SidecarIdentifier
    from costwarden.gateway.openai import OPENAI
    from costwarden.gateway.proxy import Gateway
    from costwarden.gateway.sinks import FsyncPolicy, MemorySink
    from costwarden.policy.routing import RequestTraits, RouteDecision, decide
    from costwarden.testing.gateway import sample_config

    config = sample_config(
        "http://127.0.0.1:9",
        per_job=PerJobLimits(max_cost_usd=Decimal(1_000_000)),
        model_caps=[ModelCap(model="gpt-4o-mini", max_cost_usd=Decimal(1_000_000))],
    )
    store = ConfigStore(None)
    store.set(config)
    gw = Gateway(
        config=store,
        identifier=SidecarIdentifier("team-a", "p", None),
        upstream=None,  # type: ignore[arg-type]
        sink=MemorySink(),
    )
    compiled = store.current
    assert compiled is not None
    team = config.teams[0]
    policy = compiled.policies[team.routing_policy or ""]
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "benchmark question 1"}],
    }
    raw = orjson.dumps(body)
    decision = decide(policy, RequestTraits(provider=Provider.OPENAI))
    assert isinstance(decision, RouteDecision)
    caller = Caller("sidecar", namespace="team-a", pod="p", job="job-1")
    work = Path(tempfile.mkdtemp(prefix="cw-holds-bench-"))
    journal = HoldJournal(journal_path(work / "ledger.jsonl"), fsync=FsyncPolicy.BATCH)
    journal.recover(MemorySink(), work / "ledger.jsonl")

    def call_once(samples: list[int] | None = None) -> Call:
        call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
        call.team, call.caller, call.policy_id = team, caller, policy.policy.id
        started = time.perf_counter_ns()
        gw._reserve(call, compiled, policy, dict(body), raw, decision)
        if gw.holds is not None:
            gw.holds.settled(call.id)
        gw._settle(call)
        if samples is not None:
            samples.append(time.perf_counter_ns() - started)
        return call

    gw.holds = journal
    for _ in range(in_flight):  # held throughout: what every compaction copies
        held = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
        held.team, held.caller, held.policy_id = team, caller, policy.policy.id
        gw._reserve(held, compiled, policy, dict(body), raw, decision)
    figures: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(5):
        for name, holds in (("without", None), ("with", journal)):
            gw.holds = holds
            started = time.process_time()
            for _ in range(calls):
                call_once()
            figures[name].append((time.process_time() - started) / calls * 1e6)
    gw.holds = journal
    samples: list[int] = []
    for _ in range(calls):
        call_once(samples)
    samples.sort()
    without = statistics.median(figures["without"])
    with_journal = statistics.median(figures["with"])
    return {
        "calls": calls,
        "in_flight": in_flight,
        "reserve_and_settle_cpu_us": round(without, 2),
        "with_journal_cpu_us": round(with_journal, 2),
        "journal_adds_cpu_us": round(with_journal - without, 2),
        "with_journal_wall_us": {
            "p50": samples[len(samples) // 2] / 1000,
            "p99": samples[int(len(samples) * 0.99)] / 1000,
            "max": samples[-1] / 1000,
        },
        "compactions": journal.compactions,
        "hold_line_bytes": len(next(iter(journal._open.values()), b"")) if in_flight else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = json.dumps(run(args.calls, args.in_flight), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
