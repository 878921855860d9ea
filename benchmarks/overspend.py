"""Overspend at the cap: costwarden (reserving, not reserving) vs LiteLLM, same load, same run.

    python benchmarks/overspend.py [--calls 100] [--cap 1] [--max-tokens 4096]
                                   [--latency 0.75] [--max-rounds 10] [--out r.json]
                                   [--targets reserving,not_reserving,litellm,litellm_strict,
                                              litellm_no_reservation]

Every target gets the same thing, one after the other, each with a fresh upstream:

- a slow local upstream (costwarden.testing.upstream's FakeUpstream, ``--latency`` s before
  each answer) whose answers run to their full ``max_tokens`` (its ``verbose`` fault, asked
  for by the upstream model id ``fault-verbose``): every admitted call costs its worst case;
- a cap (``--cap`` USD) and the same prices everywhere (:data:`PRICES`, declared in the
  costwarden RoutingPolicy model and in LiteLLM's ``litellm_params``/``model_info``; cached
  input at the input rate, so no pricing rule can make one cheaper than another);
- rounds of ``--calls`` concurrent chat completions issued at once, each ``max_tokens``
  ``--max-tokens`` and a distinct prompt, a round starting when the previous one has
  returned, until a round admits nothing (or ``--max-rounds``).

Spend is what the upstream would bill: its own token counts (the usage it reported for
each call it answered) times :data:`PRICES`, in Decimal. Targets:

- ``reserving``: ``costwarden gateway`` standalone (shared mode, per-team API key, the team's
  ``hardCapUSD`` = cap), reserving each call's worst case before forwarding (the default);
- ``not_reserving``: the same gateway with the benchmark-only ``--no-reservation`` (admission
  compares settled spend with the cap, cost added after the answer: the behaviour before
  issue #12);
- ``litellm``: LiteLLM's proxy (its own virtualenv, see benchmarks/gateway.py). Its key
  management (``/key/generate``) needs Postgres through Prisma, whose query engine is a
  binary Prisma downloads from its own site at install time, which this machine cannot
  reach. So the key is issued by a ``custom_auth`` hook with ``custom_auth_run_common_checks``
  on: a key object with ``max_budget`` = cap, run through LiteLLM's own budget checks and its
  optimistic budget reservation (LiteLLM >= 1.84: the estimated worst case of a call is
  added to the key's spend counter before forwarding), with spend counted in LiteLLM's
  in-memory spend counters (the single-instance, no-Redis path). :data:`LITELLM_MODE` names
  this in the output. By default LiteLLM admits a call whose estimate does not fit whole,
  its reservation cut down to what is left;
- ``litellm_strict``: the same with ``fail_closed_budget_enforcement: true`` (such a call is
  refused);
- ``litellm_no_reservation`` (not run by default): the same with
  ``disable_budget_reservation: true``, LiteLLM's read-time check only, as before 1.84.
  Without a database nothing records the key's spend outside the reservation path, so the
  check never refuses here: a figure about this harness, not about LiteLLM with a database.

Not measured here: LiteLLM's proxy-wide ``litellm_settings.max_budget``, which LiteLLM
itself warns is not enforced at all without a database.

Servers listen on 127.0.0.1 only; every call and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "operator"))

from benchmarks import gateway as bench  # noqa: E402

PER_MILLION = Decimal(1_000_000)
TARGETS = ("reserving", "not_reserving", "litellm", "litellm_strict", "litellm_no_reservation")
# litellm_no_reservation is left out by default: without a database nothing records the
# key's spend outside LiteLLM's reservation path, so its read-time check never refuses
# (measured: every call of 10 rounds admitted); that says nothing of LiteLLM with one.
DEFAULT_TARGETS = TARGETS[:4]
UPSTREAM_MODEL = "fault-verbose"  # FakeUpstream: the answer runs to its full max_tokens
MODEL = "bench-model"
LITELLM_BUDGET_KEY = "sk-bench-budget-key"
LITELLM_MODE = (
    "key with max_budget = cap issued by a custom_auth hook (custom_auth_run_common_checks: "
    "LiteLLM's key budget check and its budget reservation), in-memory spend counters; no "
    "database (key management needs Prisma's engine binaries, not installable here)"
)
# LiteLLM's variants: the general_settings each adds, and how the output names it.
LITELLM_VARIANTS = {
    "litellm": ("", ""),
    "litellm_strict": (
        "  fail_closed_budget_enforcement: true\n",
        "; fail_closed_budget_enforcement: true (a call whose estimate does not fit is refused)",
    ),
    "litellm_no_reservation": (
        "  disable_budget_reservation: true\n",
        "; disable_budget_reservation: true (read-time check only, as before LiteLLM 1.84)",
    ),
}


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; cached input is billed at the input rate."""

    input_per_m: Decimal
    output_per_m: Decimal

    def bill(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m
        ) / PER_MILLION

    def per_token(self, per_m: Decimal) -> str:
        """A LiteLLM per-token price, as an exact decimal literal (YAML reads a float)."""
        return format(per_m / PER_MILLION, "f")


PRICES = Prices(input_per_m=Decimal("2.50"), output_per_m=Decimal("10.00"))


@dataclass
class Outcome:
    """One target's run: what it admitted and what the upstream billed for it."""

    target: str
    enforcement: str
    cap: Decimal
    rounds: list[dict[str, int]] = field(default_factory=list)
    """Per round: HTTP status -> count (0: no answer, e.g. a timeout or a reset)."""
    refusal: str = ""
    """The first refusal's body (cut short): how the target says no."""
    upstream_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: Decimal = Decimal(0)
    metered: Decimal | None = None
    """What the gateway itself counted (costwarden: its ledger; LiteLLM: the sum of its
    x-litellm-response-cost headers): a check that the prices were the same."""

    @property
    def admitted(self) -> int:
        return sum(r.get(200, 0) for r in self.rounds)

    @property
    def refused(self) -> int:
        return sum(n for r in self.rounds for code, n in r.items() if code != 200)

    @property
    def overspend(self) -> Decimal:
        return max(self.billed - self.cap, Decimal(0))

    @property
    def overspend_pct(self) -> Decimal:
        return self.overspend * 100 / self.cap if self.cap else Decimal(0)

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "enforcement": self.enforcement,
            "cap_usd": str(self.cap),
            "rounds": [{str(k): v for k, v in sorted(r.items())} for r in self.rounds],
            "admitted": self.admitted,
            "refused": self.refused,
            "refusal": self.refusal,
            "upstream_calls": self.upstream_calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "billed_usd": str(self.billed),
            "metered_usd": None if self.metered is None else str(self.metered),
            "overspend_usd": str(self.overspend),
            "overspend_pct": str(self.overspend_pct.quantize(Decimal("0.1"))),
        }


def usd(value: Decimal | None) -> str:
    return "—" if value is None else f"${value.quantize(Decimal('0.000001'))}"


def table(outcomes: list[Outcome]) -> str:
    """The side-by-side Markdown table."""
    lines = [
        "| target | calls admitted | rounds | billed by the upstream | metered by the gateway "
        "| cap | overspend | overspend % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.target} | {o.admitted} | {len(o.rounds)} | {usd(o.billed)} | {usd(o.metered)} "
            f"| {usd(o.cap)} | {usd(o.overspend)} | {o.overspend_pct.quantize(Decimal('0.1'))} % |"
        )
    return "\n".join(lines)


# --- the upstream ----------------------------------------------------------------------------


def serve_upstream(port: int, latency: float) -> None:
    """FakeUpstream with every call logged, plus ``GET /_bench/usage``: the token counts of
    every answer it gave (what it would bill)."""
    from aiohttp import web

    from costwarden.testing.upstream import FakeUpstream

    fake = FakeUpstream(keep_calls=True, latency=latency)

    async def usage(_: web.Request) -> web.Response:
        answered = [c.usage for c in fake.calls if c.usage is not None]
        return web.json_response(
            {
                "calls": len(fake.calls),
                "prompt_tokens": sum(int(u["prompt_tokens"]) for u in answered),
                "completion_tokens": sum(int(u["completion_tokens"]) for u in answered),
            }
        )

    app = fake.app()
    app.router.add_get("/_bench/usage", usage)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def upstream_usage(upstream: str) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"{upstream}/_bench/usage", timeout=10) as response:  # noqa: S310
        data: dict[str, int] = json.load(response)
    return data


# --- the load --------------------------------------------------------------------------------


async def one_round(
    url: str, headers: dict[str, str], label: str, calls: int, max_tokens: int, timeout: float
) -> tuple[Counter[int], Decimal, str]:
    """``calls`` chat completions at once: their statuses, the sum of LiteLLM's cost headers
    and the first refusal's body."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # every call on its own connection, at once
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    statuses: Counter[int] = Counter()
    costs: list[Decimal] = []
    refusals: list[str] = []
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def call(i: int) -> None:
            body = {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{label} call {i}: write at length"}],
            }
            try:
                async with session.post(url, json=body, headers=headers) as response:
                    text = await response.read()
                    statuses[response.status] += 1
                    if response.status != 200:
                        refusals.append(f"{response.status} {text[:300].decode(errors='replace')}")
                    if cost := response.headers.get("x-litellm-response-cost"):
                        costs.append(Decimal(cost))
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] += 1

        await asyncio.gather(*(call(i) for i in range(calls)))
    return statuses, sum(costs, Decimal(0)), refusals[0] if refusals else ""


def run_rounds(
    outcome: Outcome, url: str, headers: dict[str, str], args: argparse.Namespace
) -> Decimal:
    """Rounds until one admits nothing; returns the sum of LiteLLM's cost headers."""
    reported = Decimal(0)
    for n in range(args.max_rounds):
        statuses, cost, refusal = asyncio.run(
            one_round(url, headers, f"{outcome.target} round {n}", args.calls, args.max_tokens,
                      args.call_timeout)
        )  # fmt: skip
        reported += cost
        outcome.refusal = outcome.refusal or refusal
        outcome.rounds.append(dict(statuses))
        print(f"{outcome.target:>14} round {n}: {dict(sorted(statuses.items()))}", flush=True)
        if not statuses.get(200):
            break
    return reported


# --- the targets -----------------------------------------------------------------------------


def costwarden_config(work: Path, upstream: str, cap: Decimal) -> tuple[Path, Path]:
    import hashlib
    from datetime import UTC, datetime, timedelta

    from costwarden.api.gatewayconfig import GatewayConfig, PolicyConfig, SpendState, TeamConfig
    from costwarden.api.routingpolicy import ModelPricing
    from costwarden.api.teambudget import Period
    from costwarden.testing.gateway import NAMESPACE, TEAM_ID, model, write_credentials

    pricing = ModelPricing(
        input_per_m_tok_usd=PRICES.input_per_m,
        output_per_m_tok_usd=PRICES.output_per_m,
        cached_input_per_m_tok_usd=PRICES.input_per_m,
        cache_write_per_m_tok_usd=PRICES.input_per_m,
    )
    route = model(MODEL, upstream, upstream_model=UPSTREAM_MODEL, pricing=pricing)
    policy = PolicyConfig.model_validate(
        {"id": "team-a/policy", "models": [route.model_dump(by_alias=True)], "defaultModel": MODEL}
    )
    now = datetime.now(UTC)
    team = TeamConfig(
        id=TEAM_ID,
        namespaces=[NAMESPACE],
        period=Period(),
        hard_cap_usd=cap,
        soft_limit_usd=cap,
        routing_policy=policy.id,
        spend=SpendState(period_start=now - timedelta(days=1), period_end=now + timedelta(days=29)),
    )
    config = GatewayConfig(teams=[team], policies=[policy], revision="overspend")
    path = work / "gateway-config.json"
    path.write_text(config.model_dump_json(by_alias=True))
    keys = work / "keys.yaml"
    keys.write_text(f"{hashlib.sha256(bench.API_KEY.encode()).hexdigest()}: {TEAM_ID}\n")
    write_credentials(work / "credentials")
    return path, keys


def ledger_cost(path: Path) -> Decimal:
    if not path.exists():
        return Decimal(0)
    total = Decimal(0)
    for line in path.read_text().splitlines():
        if line.strip():
            total += Decimal(str(json.loads(line).get("costUSD", "0")))
    return total


def run_costwarden(
    name: str, reserving: bool, work: Path, upstream: str, args: argparse.Namespace
) -> Outcome:
    config, keys = costwarden_config(work, upstream, args.cap)
    port = bench.free_port()
    ledger = work / f"ledger-{name}.jsonl"
    command = [
        sys.executable, "-m", "costwarden.gateway", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--api-keys-file", str(keys),
        "--ledger", str(ledger), "--credentials-dir", str(work / "credentials"),
        "--log-level", "WARNING", *([] if reserving else ["--no-reservation"]),
    ]  # fmt: skip
    enforcement = (
        "hardCapUSD, worst case reserved before forwarding"
        if reserving
        else "hardCapUSD, --no-reservation (settled spend checked, cost added after)"
    )
    outcome = Outcome(f"costwarden ({name.replace('_', ' ')})", enforcement, args.cap)
    with bench.process(command, work / f"{name}.log"):
        bench.wait_http(f"http://127.0.0.1:{port}/readyz", 60)
        run_rounds(
            outcome,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": f"Bearer {bench.API_KEY}"},
            args,
        )
    outcome.metered = ledger_cost(ledger)  # the gateway has stopped: its ledger is flushed
    return outcome


LITELLM_AUTH = '''"""The benchmark's budget key (no database: see benchmarks/overspend.py).

The key's spend is what LiteLLM's own spend counter for it reads (the counter its cost
callback adds each call's cost to), as a database-backed key's spend is what LiteLLM last
recorded: the hook keeps no books of its own."""
from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.utils import hash_token

KEY = {key!r}
TOKEN = hash_token(KEY)  # as a database-backed key's token: its hash, what counters are keyed by
CAP = {cap}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    from litellm.proxy.proxy_server import get_current_spend

    if api_key != KEY:
        raise HTTPException(status_code=401, detail="invalid key")
    spend = await get_current_spend(counter_key=f"spend:key:{{TOKEN}}", fallback_spend=0.0)
    return UserAPIKeyAuth(api_key=KEY, token=TOKEN, max_budget=CAP, spend=spend)
'''


def litellm_config(
    work: Path, upstream: str, cap: Decimal, variant: str, max_output_tokens: int | None = None
) -> Path:
    (work / "bench_auth.py").write_text(LITELLM_AUTH.format(key=LITELLM_BUDGET_KEY, cap=cap))
    input_price = PRICES.per_token(PRICES.input_per_m)
    output_price = PRICES.per_token(PRICES.output_per_m)
    prices = (
        f"      input_cost_per_token: {input_price}\n"
        f"      output_cost_per_token: {output_price}\n"
        f"      cache_read_input_token_cost: {input_price}\n"
    )
    ceiling = f"      max_output_tokens: {max_output_tokens}\n" if max_output_tokens else ""
    path = work / "litellm.yaml"
    path.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-fake\n"
        f"{prices}"
        "    model_info:\n"
        "      mode: chat\n"
        f"{prices}"
        f"{ceiling}"
        "general_settings:\n"
        f"  master_key: {bench.LITELLM_KEY}\n"
        "  custom_auth: bench_auth.user_api_key_auth\n"
        "  custom_auth_run_common_checks: true\n"
        f"{LITELLM_VARIANTS[variant][0]}"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    return path


def run_litellm(work: Path, upstream: str, args: argparse.Namespace, variant: str) -> Outcome:
    port = bench.free_port()
    config = litellm_config(work, upstream, args.cap, variant, args.litellm_max_output_tokens)
    command = [
        str(bench.ensure_litellm()), "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    # The local cost map: no fetch of the published one (the prices are declared anyway).
    env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    suffix = variant.removeprefix("litellm").removeprefix("_").replace("_", " ")
    name = f"LiteLLM ({suffix})" if suffix else "LiteLLM"
    outcome = Outcome(name, LITELLM_MODE + LITELLM_VARIANTS[variant][1], args.cap)
    with bench.process(command, work / "litellm.log", env):
        bench.wait_http(f"http://127.0.0.1:{port}/health/liveliness", 300)
        outcome.metered = run_rounds(
            outcome,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"Authorization": f"Bearer {LITELLM_BUDGET_KEY}"},
            args,
        )
    return outcome


def versions(targets: list[str]) -> dict[str, str]:
    import subprocess

    found = {}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    found["costwarden"] = (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout else "")
    if any(t in LITELLM_VARIANTS for t in targets):
        python = bench.ensure_litellm().parent / "python"
        probe = "import importlib.metadata as m; print(m.version('litellm'))"
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        found["litellm"] = done.stdout.strip() or "unknown"
    return found


def run_target(target: str, work: Path, args: argparse.Namespace) -> Outcome:
    """One target against its own fresh upstream; the bill is that upstream's."""
    port = bench.free_port()
    upstream = f"http://127.0.0.1:{port}"
    up_args = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(port),
               "--latency", str(args.latency)]  # fmt: skip
    target_work = work / target
    target_work.mkdir()
    with bench.process(up_args, target_work / "upstream.log"):
        bench.wait_http(f"{upstream}/v1/models", 30)
        if target in LITELLM_VARIANTS:
            outcome = run_litellm(target_work, upstream, args, target)
        else:
            outcome = run_costwarden(target, target == "reserving", target_work, upstream, args)
        used = upstream_usage(upstream)
    outcome.upstream_calls = used["calls"]
    outcome.prompt_tokens = used["prompt_tokens"]
    outcome.completion_tokens = used["completion_tokens"]
    outcome.billed = PRICES.bill(outcome.prompt_tokens, outcome.completion_tokens)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls per round")
    parser.add_argument("--cap", type=Decimal, default=Decimal(1), help="the cap in USD")
    parser.add_argument("--max-tokens", type=int, default=4096, help="max_tokens of each call")
    parser.add_argument("--latency", type=float, default=0.75, help="upstream seconds per call")
    parser.add_argument("--max-rounds", type=int, default=10, help="bound on the rounds")
    parser.add_argument("--call-timeout", type=float, default=120.0, help="seconds per call")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, from {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--litellm-max-output-tokens",
        type=int,
        help="declare the model's max_output_tokens to LiteLLM (default: undeclared; LiteLLM "
        "then clamps its reservation's output at 16,384 tokens)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.latency)
        return 0
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every child process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="cw-overspend-") as tmp:
        for target in targets:
            outcomes.append(run_target(target, Path(tmp), args))
    results = {
        "started": started,
        "versions": versions(targets),
        "load": {
            "concurrent_calls": args.calls,
            "max_tokens": args.max_tokens,
            "upstream_latency_s": args.latency,
            "cap_usd": str(args.cap),
            "litellm_max_output_tokens": args.litellm_max_output_tokens,
            "prices_per_m_tokens_usd": {k: str(v) for k, v in asdict(PRICES).items()},
        },
        "targets": [o.summary() for o in outcomes],
    }
    text = json.dumps(results, indent=2)
    print(text)
    print()
    for o in outcomes:
        print(f"- {o.target}: {o.enforcement}")
    print()
    print(table(outcomes))
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
