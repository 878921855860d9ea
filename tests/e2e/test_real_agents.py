"""Issue #11: the agents people run work through the gateway unchanged, and their tokens
are metered to the right team and Job.

Claude Code and Codex CLI (npm, pinned in tests/support/agents.py, installed once into
~/.cache/costwarden/agents) and the OpenAI Agents SDK (``openai-agents``, pinned in the
test extra) each run one non-interactive task against the e2e stack's gateway, with a team
key for their own Job. The fake upstream answers the first call with a call to the first
tool offered, and the call after the tool's result with its deterministic text, so each
agent goes through one tool round trip (Claude Code also runs ``/context``, which counts
tokens without billing; the Agents SDK runs once plain and once streamed). Each test asserts
the agent finished (exit code 0, the upstream's text), that every request it sent was
answered (no 404 from a route the gateway lacks), and that the TeamBudget's status holds
exactly the upstream's bill (Decimal, and the tokens by kind) attributed to the agent's Job.
The routes each agent called are printed (``-s``); docs/agents.md lists them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from costwarden.api.catalog import default_catalog
from costwarden.api.routingpolicy import ModelBackend, Provider
from costwarden.api.teambudget import TokenUsage
from costwarden.policy.pricing import call_cost, resolve_pricing
from costwarden.testing.answers import REPLY
from costwarden.testing.upstream import ServedCall
from tests.support.agents import CLAUDE_CODE, CODEX, RouteLog, install_agents
from tests.support.polling import wait_for
from tests.support.stack import GROUP, VERSION, Stack, budget_manifest, job_manifest

GPT = "gpt-5-mini"
CLAUDE = "claude-sonnet-4-5"
CLAUDE_SMALL = "claude-haiku-4-5"
PROVIDERS = {GPT: Provider.OPENAI, CLAUDE: Provider.ANTHROPIC, CLAUDE_SMALL: Provider.ANTHROPIC}
TASK = "Say hello in one sentence."
AGENT_TIMEOUT = 180
# Only the system's directories: an agent must not find a developer's tools (or config).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="session")
def agents() -> dict[str, Path]:
    """Claude Code and Codex CLI at their pinned versions (installed on first use)."""
    started = time.monotonic()
    found = install_agents()
    print(f"agents ready in {time.monotonic() - started:.1f}s: {found}")
    return found


def routing_policy(upstream_url: str) -> dict[str, Any]:
    """OpenAI calls to gpt-4o-mini, Anthropic calls to the Claude model they name; the
    local upstream stands in for models served in the cluster."""
    models = [
        {
            "name": name,
            "provider": provider.value,
            "endpoint": f"{upstream_url}/v1" if provider is Provider.OPENAI else upstream_url,
            "locality": "InCluster",
        }
        for name, provider in PROVIDERS.items()
    ]
    rules = [
        {"name": name.replace(".", "-"), "match": {"requestedModels": [name]}, "model": name}
        for name, provider in PROVIDERS.items()
        if provider is Provider.ANTHROPIC
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": "routing"},
        "spec": {"models": models, "rules": rules, "defaultModel": GPT},
    }


class AgentTeam:
    """A team with one agent Job and its key, in the gateway's configuration."""

    def __init__(self, stack: Stack, namespace: str, job: str) -> None:
        self.stack, self.namespace, self.job = stack, namespace, job
        stack.create(namespace, routing_policy(stack.upstream_url))
        stack.create(namespace, budget_manifest("agents", "5"))
        self.team = f"{namespace}/agents"
        wait_for(lambda: stack.mirror.has_team(self.team), timeout=30, what="team in config")
        stack.create(namespace, job_manifest(job, "agents"))
        self.key = str(stack.gateway.agent(self.team, namespace, job).api_key)


@pytest.fixture
def routes(stack: Stack) -> Iterator[RouteLog]:
    """Every request the agent sends, recorded on its way to the gateway."""
    with RouteLog(stack.gateway.url) as log:
        yield log
    print("routes called:", json.dumps(log.routes(), indent=1))


def tokens_of(call: ServedCall) -> TokenUsage:
    """The usage the upstream reported for one call, as the provider bills it."""
    usage = call.usage or {}
    if call.path == "/v1/messages":
        return TokenUsage(
            input=usage["input_tokens"],
            output=usage["output_tokens"],
            cached_input=usage.get("cache_read_input_tokens") or 0,
            cache_creation=usage.get("cache_creation_input_tokens") or 0,
        )
    if call.path == "/v1/responses":
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
        return TokenUsage(
            input=usage["input_tokens"] - cached, output=usage["output_tokens"], cached_input=cached
        )
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return TokenUsage(
        input=usage["prompt_tokens"] - cached,
        output=usage.get("completion_tokens", 0),
        cached_input=cached,
    )


def billed(stack: Stack) -> list[ServedCall]:
    return [call for call in stack.upstream.calls if call.usage is not None]


def upstream_bill(stack: Stack) -> tuple[Decimal, TokenUsage]:
    """The exact price of every usage the upstream reported, and the tokens by kind."""
    total, tokens = Decimal(0), TokenUsage()
    for call in billed(stack):
        backend = ModelBackend(
            name=call.model, provider=PROVIDERS[call.model], endpoint="https://api.example.com/v1"
        )
        pricing = resolve_pricing(backend, default_catalog())
        assert pricing is not None, call.model
        used = tokens_of(call)
        total += call_cost(used, pricing)
        tokens = TokenUsage(
            input=tokens.input + used.input,
            output=tokens.output + used.output,
            cached_input=tokens.cached_input + used.cached_input,
            cache_creation=tokens.cache_creation + used.cache_creation,
        )
    return total, tokens


def assert_metered(team: AgentTeam, calls: int) -> None:
    """The TeamBudget's status holds exactly the upstream's bill, all of it on the Job."""
    stack = team.stack
    assert len(billed(stack)) == calls, [(c.path, c.model) for c in stack.upstream.calls]
    expected, tokens = upstream_bill(stack)
    status = wait_for(
        lambda: (
            (s := stack.status(team.namespace, "agents")).get("spentExactUSD") is not None
            and Decimal(s["spentExactUSD"]) == expected
            and s
        ),
        timeout=30,
        what=f"status spend {expected}",
    )
    assert status["tokens"] == {
        "input": tokens.input,
        "output": tokens.output,
        "cachedInput": tokens.cached_input,
        "cacheCreation": tokens.cache_creation,
        "cacheCreation1h": tokens.cache_creation_1h,
    }
    jobs = status["byJob"]["jobs"]
    assert [(j["namespace"], j["name"]) for j in jobs] == [(team.namespace, team.job)]
    assert Decimal(jobs[0]["spentUSD"]) == expected
    assert jobs[0]["requests"] == calls
    assert Decimal(status["byJob"].get("otherUSD", "0")) == 0


def run_agent(
    command: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=AGENT_TIMEOUT,
    )  # fmt: skip
    print(f"{command[0]} ran in {time.monotonic() - started:.1f}s, exit {done.returncode}")
    print("stdout:", done.stdout[-4000:], "\nstderr:", done.stderr[-4000:])
    return done


def test_claude_code_completes_a_task_metered_to_its_team_and_job(
    stack: Stack, namespace: str, agents: dict[str, Path], routes: RouteLog, tmp_path: Path
):
    team = AgentTeam(stack, namespace, "claude-code")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": routes.url,
        "ANTHROPIC_API_KEY": team.key,
        "ANTHROPIC_MODEL": CLAUDE,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": CLAUDE,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": CLAUDE_SMALL,
        "CLAUDE_CODE_SUBAGENT_MODEL": CLAUDE,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    done = run_agent(
        [str(agents[CLAUDE_CODE]), "-p", TASK, "--output-format", "json"], env, tmp_path
    )
    assert done.returncode == 0
    result = json.loads(done.stdout)
    assert result["is_error"] is False
    assert result["result"] == REPLY

    # The first answer used a tool, Claude Code sent back its result, the second was text.
    calls = [c for c in stack.upstream.calls if c.path == "/v1/messages"]
    assert [c.model for c in calls] == [CLAUDE, CLAUDE]
    assert all(c.stream and c.body.get("tools") for c in calls)
    assert calls[1].body["messages"][-1]["content"][0]["type"] == "tool_result"
    # Its beta headers reach the upstream (the gateway passes the Anthropic headers on).
    assert all("anthropic-beta" in {k.lower() for k in c.headers} for c in calls)

    # /context counts the context's tokens with POST /v1/messages/count_tokens?beta=true
    # (interactive sessions do the same): answered through the routed Claude model, free.
    done = run_agent([str(agents[CLAUDE_CODE]), "-p", "/context"], env, tmp_path)
    assert done.returncode == 0
    assert "Context Usage" in done.stdout
    counted = [c for c in stack.upstream.calls if c.path == "/v1/messages/count_tokens"]
    assert counted
    assert all(c.model == CLAUDE and c.query == "beta=true" for c in counted)
    assert all(c.usage is None for c in counted)

    assert all(status < 400 for _, _, status in routes.seen), routes.routes()
    assert_metered(team, calls=2)


def codex_config(base_url: str) -> str:
    """The config.toml docs/agents.md gives users, with the gateway's URL."""
    return f"""\
model = "{GPT}"
model_provider = "costwarden"

[model_providers.costwarden]
name = "costwarden"
base_url = "{base_url}/v1"
env_key = "COSTWARDEN_API_KEY"
wire_api = "responses"
"""


def test_codex_cli_completes_a_task_metered_to_its_team_and_job(
    stack: Stack, namespace: str, agents: dict[str, Path], routes: RouteLog, tmp_path: Path
):
    team = AgentTeam(stack, namespace, "codex")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(codex_config(routes.url))
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(home),
        "CODEX_HOME": str(home),
        "COSTWARDEN_API_KEY": team.key,
    }
    command = [
        str(agents[CODEX]), "exec", "--skip-git-repo-check", "--sandbox", "read-only",
        "--color", "never", TASK,
    ]  # fmt: skip
    done = run_agent(command, env, work)
    assert done.returncode == 0
    assert done.stdout.strip() == REPLY

    calls = [c for c in stack.upstream.calls if c.path == "/v1/responses"]
    assert [c.model for c in calls] == [GPT, GPT]
    assert all(c.stream and c.body.get("tools") for c in calls)
    assert calls[1].body["input"][-1]["type"] == "function_call_output"
    # Codex asks a gpt-5 model for reasoning: its tokens are billed as output, and metered.
    assert all(c.body.get("reasoning") for c in calls)
    assert all(c.usage and c.usage["output_tokens_details"]["reasoning_tokens"] for c in calls)
    assert all(status < 400 for _, _, status in routes.seen), routes.routes()
    assert_metered(team, calls=2)


AGENTS_SDK_SCRIPT = """\
import asyncio
import sys
from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)

def use_gateway():
    # An AsyncOpenAI client belongs to one event loop: one per run_sync / asyncio.run.
    set_default_openai_client(AsyncOpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2]))

@function_tool
def get_weather(query: str) -> str:
    \"\"\"The weather for a city.\"\"\"
    print("tool called with", query, file=sys.stderr)
    return "sunny, 21 C"

agent = Agent(name="assistant", instructions="You are terse.", model=sys.argv[3],
              tools=[get_weather])
use_gateway()
result = Runner.run_sync(agent, sys.argv[4])
print(result.final_output)

async def streamed():
    run = Runner.run_streamed(agent, sys.argv[4])
    async for _ in run.stream_events():
        pass
    print(run.final_output)

use_gateway()
asyncio.run(streamed())
"""


def test_openai_agents_sdk_completes_a_task_metered_to_its_team_and_job(
    stack: Stack, namespace: str, routes: RouteLog, tmp_path: Path
):
    team = AgentTeam(stack, namespace, "agents-sdk")
    script = tmp_path / "agent.py"
    script.write_text(AGENTS_SDK_SCRIPT)
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    if "VIRTUAL_ENV" in os.environ:
        env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    done = run_agent(
        [sys.executable, str(script), routes.url, team.key, GPT, "What is the weather in Paris?"],
        env,
        tmp_path,
    )
    assert done.returncode == 0
    assert done.stdout.splitlines() == [REPLY, REPLY]  # Runner.run_sync, Runner.run_streamed
    assert done.stderr.count("tool called with weather in Paris") == 2

    calls = [c for c in stack.upstream.calls if c.path == "/v1/responses"]
    assert [(c.model, c.stream) for c in calls] == [(GPT, False)] * 2 + [(GPT, True)] * 2
    for answered in (calls[1], calls[3]):
        assert answered.body["input"][-1]["type"] == "function_call_output"
        assert answered.body["input"][-1]["output"] == "sunny, 21 C"
    assert all(status < 400 for _, _, status in routes.seen), routes.routes()
    assert_metered(team, calls=4)
