"""Operator scale: 1,000 TeamBudgets, 5,000 agent Jobs in 50 namespaces, on the local control
plane (kube-apiserver + etcd + kube-controller-manager), the operator as a process.

Measures, as Kueue's scale tests do (per object, with the controller's memory and calls):

1. API requests per minute at rest, counted by a proxy in front of the API server that
   only the operator uses: with the 1,000 budgets and no Jobs, then with 5,000 Jobs.
2. Time from a cap crossing to the team's Jobs suspended, for 100 teams crossing at
   10 per second: from sending the usage batch that crosses the cap, and from its
   acknowledgement (the status write), to each Job seen with ``spec.suspend: true``.
3. The operator's resident memory (RSS now and peak) with everything loaded.

Jobs are created with ``parallelism: 0``: active, unsuspended Jobs without pods, so the
Job controller does not create 5,000 Pending pods (the enforcement path, a LIST by label
selector and a PATCH per Job, is the same). Run: ``python -m benchmarks.operator_scale``
(``--teams``, ``--jobs-per-team``, ``--rest-seconds`` to scale it down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from benchmarks.apiproxy import CountingProxy, summary
from kubernetes import config

from costwarden.cluster import LocalControlPlane, ensure_control_plane_binaries
from costwarden.controllers.rest import ApiError, Rest

REPO = Path(__file__).resolve().parents[1]
NAMESPACES = 50
GROUP = "/apis/costwarden.io/v1alpha1"


def budget(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
        "metadata": {"name": name},
        "spec": {"hardCapUSD": "1", "routingPolicyRef": {"name": "routing"},
                 "workloads": {"selector": {"matchLabels": {"team": name}}}},
    }  # fmt: skip


POLICY = {
    "apiVersion": "costwarden.io/v1alpha1", "kind": "RoutingPolicy",
    "metadata": {"name": "routing"},
    "spec": {"models": [{"name": "gpt-4o-mini", "provider": "OpenAI",
                         "endpoint": "https://api.openai.com/v1"}],
             "defaultModel": "gpt-4o-mini"},
}  # fmt: skip


def job(name: str, team: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"team": team}},
        "spec": {"parallelism": 0, "template": {"metadata": {"labels": {"team": team}},
                 "spec": {"restartPolicy": "Never",
                          "containers": [{"name": "a", "image": "busybox"}]}}},
    }  # fmt: skip


async def create_all(rest: Rest, items: list[tuple[str, dict[str, Any]]], width: int = 16) -> None:
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            path, body = queue.pop()
            for attempt in range(5):
                try:
                    await rest.request("POST", path, body=body, timeout=120)
                    break
                except ApiError as error:
                    if error.status == 409:
                        break  # exists already (a retried create that had landed)
                    if error.status not in (429, 500, 503, 504) or attempt == 4:
                        raise
                except TimeoutError:
                    if attempt == 4:
                        raise
                await asyncio.sleep(1 + attempt)

    await asyncio.gather(*(worker() for _ in range(width)))


def teams(count: int) -> list[tuple[str, str]]:
    return [(f"bench-{i % NAMESPACES:02d}", f"team-{i // NAMESPACES:03d}") for i in range(count)]


async def setup_budgets(rest: Rest, count: int) -> None:
    namespaces = sorted({ns for ns, _ in teams(count)})
    await create_all(
        rest, [("/api/v1/namespaces", {"metadata": {"name": ns}}) for ns in namespaces]
    )
    await create_all(
        rest, [(f"{GROUP}/namespaces/{ns}/routingpolicies", POLICY) for ns in namespaces]
    )
    await create_all(
        rest, [(f"{GROUP}/namespaces/{ns}/teambudgets", budget(t)) for ns, t in teams(count)]
    )


async def setup_jobs(rest: Rest, count: int, per_team: int) -> None:
    await create_all(rest, [
        (f"/apis/batch/v1/namespaces/{ns}/jobs", job(f"{t}-agent-{k}", t))
        for ns, t in teams(count) for k in range(per_team)
    ])  # fmt: skip


async def reconciled(rest: Rest, count: int) -> int:
    listing = await rest.get(f"{GROUP}/teambudgets")
    return sum(1 for b in listing["items"] if (b.get("status") or {}).get("currentPeriod"))


def rss(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def measure_crossings(
    rest: Rest,
    ingest: str,
    token: str,
    sample: list[tuple[str, str]],
    per_team: int,
    ca: Path,
) -> dict[str, list[float]]:
    """Cross the cap of each sampled team (10 per second); time each Job's suspension."""
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    suspended: dict[tuple[str, str], float] = {}
    expected = {(ns, f"{t}-agent-{k}") for ns, t in sample for k in range(per_team)}
    listing = await rest.get("/apis/batch/v1/jobs", {"limit": "1"})
    version = listing["metadata"]["resourceVersion"]

    async def watch() -> None:
        params = {"resourceVersion": version, "labelSelector": "costwarden.io/suspended-for=cap"}
        async for event in rest.watch("/apis/batch/v1/jobs", params, timeout=300):
            obj = event.get("object") or {}
            meta = obj.get("metadata") or {}
            key = (meta.get("namespace"), meta.get("name"))
            if (obj.get("spec") or {}).get("suspend") and key not in suspended:
                suspended[key] = time.monotonic()
            if expected <= suspended.keys():
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(1)
    verify = ssl.create_default_context(cafile=str(ca))  # ingestion is HTTPS only
    async with httpx.AsyncClient(timeout=30, verify=verify) as http:

        async def cross(ns: str, team: str, seq: int) -> None:
            record = {
                "time": datetime.now(UTC).isoformat(), "team": f"{ns}/{team}", "namespace": ns,
                "job": f"{team}-agent-0", "endpoint": "chat.completions", "caller": "key",
                # The operator recomputes the cost: 2.5M output tokens at 0.60/M are 1.5 USD.
                "servedModel": "gpt-4o-mini", "tokens": {"input": 0, "output": 2_500_000},
                "usageReported": True, "costUSD": "1.5", "outcome": "OK",
            }  # fmt: skip
            batch = {"source": "bench", "items": [{"seq": seq, "record": record}]}
            sent[f"{ns}/{team}"] = time.monotonic()
            answer = await http.post(
                ingest, json=batch, headers={"Authorization": f"Bearer {token}"}
            )
            answer.raise_for_status()
            acked[f"{ns}/{team}"] = time.monotonic()

        crossings = []
        for seq, (ns, team) in enumerate(sample, start=1):
            crossings.append(asyncio.create_task(cross(ns, team, seq)))
            await asyncio.sleep(0.1)
        await asyncio.gather(*crossings)
    await asyncio.wait_for(watcher, 120)
    from_send, from_ack = [], []
    for (ns, name), moment in suspended.items():
        team = f"{ns}/{name.rsplit('-agent-', 1)[0]}"
        from_send.append(moment - sent[team])
        from_ack.append(moment - acked[team])
    return {"from_send": from_send, "from_ack": from_ack}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def at_rest(proxy: CountingProxy, seconds: float) -> dict[str, Any]:
    start = time.monotonic()
    await asyncio.sleep(seconds)
    return summary(proxy.requests_between(start, time.monotonic()), seconds)


async def main_async(args: argparse.Namespace, plane: LocalControlPlane, work: Path) -> dict:
    admin = Rest.from_api_client(config.new_client_from_config(str(plane.kubeconfig_path)))
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    await create_all(admin, [("/api/v1/namespaces", {"metadata": {"name": "costwarden-system"}})])
    started = time.monotonic()
    progress(f"creating {args.teams} TeamBudgets")
    await setup_budgets(admin, args.teams)
    created_budgets = time.monotonic() - started
    proxy = CountingProxy(str(plane.kubeconfig_path)).start()
    token = secrets.token_hex(16)
    (work / "token").write_text(token)
    port = 18081
    log = (work / "operator.log").open("ab")
    operator = subprocess.Popen(
        [sys.executable, "-m", "costwarden", "operator", "--standalone",
         "--kubeconfig", str(proxy.kubeconfig(work / "proxy.kubeconfig")),
         "--namespace", "costwarden-system", "--metrics-port", "0", "--health-port", "0",
         "--ingest-port", str(port), "--ingest-listen-address", "127.0.0.1",
         "--ingest-token-file", str(work / "token"), "--ingest-cert-dir", str(work / "tls"),
         *(["--verbose"] if args.verbose else [])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        progress("operator started; waiting for every budget's first status")
        while (done := await reconciled(admin, args.teams)) < args.teams:
            if operator.poll() is not None:
                raise RuntimeError(f"operator exited; see {work / 'operator.log'}")
            progress(f"{done} budgets reconciled")
            await asyncio.sleep(2)
        first_pass = time.monotonic() - t0
        await asyncio.sleep(args.settle)
        progress("measuring API requests at rest (no Jobs)")
        rest_no_jobs = await at_rest(proxy, args.rest_seconds)
        memory_no_jobs = rss(operator.pid)
        t1 = time.monotonic()
        progress(f"creating {args.teams * args.jobs_per_team} Jobs")
        await setup_jobs(admin, args.teams, args.jobs_per_team)
        created_jobs = time.monotonic() - t1
        await asyncio.sleep(args.settle)
        progress("measuring API requests at rest (with Jobs)")
        rest_jobs = await at_rest(proxy, args.rest_seconds)
        memory_jobs = rss(operator.pid)
        sample = teams(args.teams)[:: max(1, args.teams // args.crossings)][: args.crossings]
        progress(f"crossing the cap of {len(sample)} teams")
        latencies = await measure_crossings(
            admin,
            f"https://127.0.0.1:{port}/v1/usage",
            token,
            sample,
            args.jobs_per_team,
            work / "tls" / "ca.crt",
        )
        memory_end = rss(operator.pid)
    finally:
        operator.terminate()
        operator.wait(30)
        proxy.stop()
        if proxy.trace is not None:
            (work / "api-trace.log").write_text("\n".join(proxy.trace) + "\n")
        await admin.close()
    return {
        "budgets": args.teams,
        "jobs": args.teams * args.jobs_per_team,
        "namespaces": min(NAMESPACES, args.teams),
        "setup_seconds": {"budgets": round(created_budgets, 1), "jobs": round(created_jobs, 1)},
        "first_reconciliation_seconds": round(first_pass, 1),
        "api_requests_at_rest": {"no_jobs": rest_no_jobs, "with_jobs": rest_jobs},
        "cap_to_suspended_seconds": {
            name: {
                "n": len(v),
                "p50": round(percentile(v, 0.5), 3),
                "p99": round(percentile(v, 0.99), 3),
                "max": round(max(v), 3),
                "mean": round(statistics.fmean(v), 3),
            }
            for name, v in latencies.items()
        },
        "operator_rss_mib": {
            "no_jobs": round(memory_no_jobs[0], 1),
            "with_jobs": round(memory_jobs[0], 1),
            "after_crossings": round(memory_end[0], 1),
            "peak": round(memory_end[1], 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.operator_scale")
    parser.add_argument("--teams", type=int, default=1000)
    parser.add_argument("--jobs-per-team", type=int, default=5)
    parser.add_argument("--crossings", type=int, default=100)
    parser.add_argument("--rest-seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=20.0)
    parser.add_argument("--verbose", action="store_true", help="the operator logs at debug level")
    parser.add_argument("--workdir", help="keep the operator log here (default: a temp dir)")
    args = parser.parse_args(argv)
    binaries = ensure_control_plane_binaries()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cw-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    progress(f"work directory {work} (operator.log)")
    with LocalControlPlane(binaries_dir=binaries, with_controller_manager=True) as plane:
        result = asyncio.run(main_async(args, plane, work))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
