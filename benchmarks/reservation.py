"""What reserving before forwarding adds: the same gateway with and without it, same run.

    python benchmarks/reservation.py [--duration 10] [--rounds 3] [--rate 1000]
                                     [--out results.json]

Two measurements:

1. **End to end** (vegeta, constant rate, open loop): the fake upstream and two
   ``costwarden gateway`` processes on the same configuration (shared mode, per-team key,
   loop detection on, decision log on, a per-job cap and a modelCaps entry so every
   limit is reserved against), one started with the benchmark-only ``--no-reservation``.
   They are attacked in turn, alternating for ``--rounds`` rounds (A B A B ...) so drift
   on a shared machine lands on both, plain and streaming chat completions at ``--rate``
   rps; the added latency is the difference of the medians of the per-round p50/p99.
2. **In process**: the reservation step alone (``Gateway._reserve`` and the release at
   settlement) timed over many calls, without network or scheduler noise.

Reuses benchmarks/gateway.py's helpers (vegeta, process control, targets). Servers listen
on 127.0.0.1 only; every run is bounded in time.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[0] / "operator"))

import gateway as bench  # noqa: E402  (benchmarks/gateway.py)


def write_config(work: Path, upstream: str) -> tuple[Path, Path]:
    import hashlib

    from costwarden.api.teambudget import ModelCap, PerJobLimits
    from costwarden.testing.gateway import TEAM_ID, sample_config, write_credentials

    config = sample_config(
        upstream,
        hard_cap_usd=Decimal(1_000_000),
        soft_limit_usd=Decimal(999_999),
        per_job=PerJobLimits(max_cost_usd=Decimal(1_000_000)),
        model_caps=[ModelCap(model="gpt-4o-mini", max_cost_usd=Decimal(1_000_000))],
    )
    path = work / "gateway-config.json"
    path.write_text(config.model_dump_json(by_alias=True))
    keys = work / "keys.yaml"
    keys.write_text(f"{hashlib.sha256(bench.API_KEY.encode()).hexdigest()}: {TEAM_ID}\n")
    write_credentials(work / "credentials")
    return path, keys


def in_process(calls: int = 20_000) -> dict[str, float]:
    """CPU microseconds per call of the reservation step and its release: the least of 5
    runs (CPU time and the minimum: other processes on a shared machine only add)."""
    import orjson

    from costwarden.api.teambudget import ModelCap, PerJobLimits
    from costwarden.api.usage import Endpoint
    from costwarden.gateway.call import Call
    from costwarden.gateway.config import ConfigStore
    from costwarden.gateway.identity import SidecarIdentifier
    from costwarden.gateway.openai import OPENAI
    from costwarden.gateway.proxy import Gateway
    from costwarden.gateway.sinks import MemorySink
    from costwarden.policy.routing import RequestTraits, decide
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
    from costwarden.api.routingpolicy import Provider
    from costwarden.gateway.identity import Caller

    decision = decide(policy, RequestTraits(provider=Provider.OPENAI))
    caller = Caller("sidecar", namespace="team-a", pod="p", job="job-1")
    per_run = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(calls):
            call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
            call.team, call.caller, call.policy_id = team, caller, policy.policy.id
            gw._reserve(call, compiled, policy, dict(body), raw, decision)
            assert call.reservation is not None
            gw._settle(call)
        per_run.append((time.process_time() - started) / calls * 1e6)
    base = []  # the Call construction is in the loop above too: subtract it
    for _ in range(5):
        started = time.process_time()
        for _ in range(calls):
            call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
            call.team, call.caller, call.policy_id = team, caller, policy.policy.id
            dict(body)
        base.append((time.process_time() - started) / calls * 1e6)
    return {"reserve_and_settle_us": round(statistics.median(per_run) - statistics.median(base), 2)}


def end_to_end(args: argparse.Namespace, work: Path) -> dict[str, object]:
    bench.ensure_vegeta()
    runner = bench.Bench(args.duration)
    up_port = bench.free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    up_args = [sys.executable, "-m", "costwarden.testing.upstream", "--port", str(up_port)]
    results: dict[str, dict[str, list[bench.Run]]] = {}
    with bench.process(up_args, work / "up.log"):
        bench.wait_http(f"{upstream}/v1/models", 30)
        config, keys = write_config(work, upstream)
        targets = {}
        commands = {}
        for name, extra in (("reserving", []), ("not_reserving", ["--no-reservation"])):
            port = bench.free_port()
            commands[name] = [
                sys.executable, "-m", "costwarden.gateway", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port), "--api-keys-file", str(keys),
                "--ledger", str(work / f"ledger-{name}.jsonl"),
                "--credentials-dir", str(work / "credentials"), *extra,
            ]  # fmt: skip
            targets[name] = bench.Target(
                name,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                {"Authorization": f"Bearer {bench.API_KEY}"},
                work,
            )
        # Both gateways run for the whole measurement: each waits idle while the other is
        # attacked, so neither's backlog lands on the other's figures.
        with (
            bench.process(commands["reserving"], work / "reserving.log") as a,
            bench.process(commands["not_reserving"], work / "not_reserving.log") as b,
        ):
            pids = {"reserving": a.pid, "not_reserving": b.pid}
            for target in targets.values():
                bench.wait_http(target.url.rsplit("/v1", 1)[0] + "/readyz", 30)
                runner.warm_up(target)
            for _ in range(args.rounds):
                for mode in ("plain", "stream"):
                    for name, target in targets.items():
                        bench.wait_idle(pids[name])
                        run = runner.measure(target, mode, args.rate)
                        results.setdefault(mode, {}).setdefault(name, []).append(run)
    summary: dict[str, object] = {}
    for mode, by_name in results.items():
        row: dict[str, object] = {}
        for name, runs in by_name.items():
            row[name] = {
                "p50_ms": round(statistics.median(r.p50_ms for r in runs), 3),
                "p99_ms": round(statistics.median(r.p99_ms for r in runs), 3),
                "success": min(r.success for r in runs),
                "rounds_p50_ms": [round(r.p50_ms, 3) for r in runs],
            }
        on, off = row["reserving"], row["not_reserving"]
        assert isinstance(on, dict)
        assert isinstance(off, dict)
        row["added_p50_ms"] = round(on["p50_ms"] - off["p50_ms"], 3)
        row["added_p99_ms"] = round(on["p99_ms"] - off["p99_ms"], 3)
        summary[mode] = row
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per attack")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per mode")
    parser.add_argument("--rate", type=int, default=1000, help="requests per second")
    parser.add_argument("--skip-e2e", action="store_true", help="in-process figure only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    results: dict[str, object] = {"in_process": in_process()}
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="cw-reserve-bench-") as tmp:
            results[f"end_to_end_{args.rate}rps"] = end_to_end(args, Path(tmp))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
