"""The demo's story, step by step: each step starts something real and shows its effect."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes import client

from costwarden.api.crd import all_crds
from costwarden.cluster.binaries import (
    CONTROL_PLANE_BINARIES,
    control_plane_cache_dir,
    find_kubebuilder_assets,
    missing_binaries,
)
from costwarden.demo import manifests
from costwarden.demo.agent import Agent, CallResult
from costwarden.demo.display import Display
from costwarden.demo.stack import REPO_FILES, DemoStack, demo_stack, wait_until

STEPS = 7
GROUP, VERSION = "costwarden.io", "v1alpha1"
STOP_DEADLINE_SECONDS = 30.0
"""After the first refused call, the Job must be suspended within this (the cap invariant)."""
CALL_INTERVAL_SECONDS = 0.05
"""Pacing, so a person can watch the bar fill; the gateway itself is not the limit."""


@dataclass
class Outcome:
    soft_limit_seen_at: Decimal | None = None
    refused_at: float | None = None
    suspended_after: float | None = None
    refusal: str = ""


def run(args: argparse.Namespace) -> int:
    display = Display(STEPS, interactive=sys.stdout.isatty() and not args.plain)
    with demo_stack(args.workdir) as stack:
        try:
            _bring_up(stack, display, args)
            outcome = _spend_until_stopped(stack, display)
            _show_final_state(stack, display, outcome)
            if args.keep:
                display.note("everything is still running; press Ctrl-C to stop and clean up")
                _wait_for_interrupt()
        except KeyboardInterrupt:
            display.note("interrupted: stopping everything")
            return 130
        ok = outcome.suspended_after is not None
        display.note(f"done in {display.elapsed():.0f} s" if ok else "the job was NOT stopped")
        if not ok:
            display.detail(_logs(stack))
        return 0 if ok else 1


def _bring_up(stack: DemoStack, display: Display, args: argparse.Namespace) -> None:
    if args.kubeconfig:
        display.step(f"using the cluster of {args.kubeconfig}")
        stack.use_kubeconfig(Path(args.kubeconfig))
    else:
        display.step(
            "starting a local control plane: etcd, kube-apiserver, kube-controller-manager"
        )
        if needs_build():
            display.note("first run: building them from Go modules (5-10 minutes, cached after)")
        started = time.monotonic()
        stack.start_local_cluster()
        display.note(f"Kubernetes v1.34.4 ready in {time.monotonic() - started:.1f} s")

    display.step("installing the CRDs and applying examples/")
    stack.apply(*all_crds().values())
    for crd in all_crds().values():
        stack.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      f"crd/{crd['metadata']['name']}")  # fmt: skip
    stack.apply({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": manifests.OPERATOR_NAMESPACE}})  # fmt: skip
    examples = REPO_FILES / "examples"
    if examples.is_dir():
        stack.apply_path(examples)
        display.note(
            "kubectl apply -f examples/: TeamBudgets payments and support, RoutingPolicy standard"
        )

    display.step("starting the operator (Kopf)")
    stack.start_operator()
    stack.start_upstream()
    stack.apply(
        manifests.namespace(),
        manifests.routing_policy(stack.upstream_url),
        manifests.team_budget(),
    )
    wait_until(lambda: _ready(stack, manifests.BUDGET), 60, "the demo budget to be Ready")
    display.note(
        f"TeamBudget {manifests.DEMO_NAMESPACE}/{manifests.BUDGET}: hard cap "
        f"${manifests.HARD_CAP_USD}, soft limit {manifests.SOFT_LIMIT_PERCENT}% "
        f"(Ready, gateway ConfigMap written)"
    )

    display.step("creating the agent Job and its gateway sidecar (with a local model upstream)")
    stack.apply(manifests.agent_job())
    pod = wait_until(lambda: _job_pod(stack), 60, "the Job controller to create the agent pod")
    stack.start_config_sync()
    stack.start_gateway_sidecar(pod["name"], pod["labels"])
    display.note(f"pod {pod['name']} → gateway {stack.gateway_url} → upstream {stack.upstream_url}")


def _spend_until_stopped(stack: DemoStack, display: Display) -> Outcome:
    display.step(
        f"the agent reviews code through the gateway ({manifests.FRONTIER} for code review)"
    )
    agent = Agent(stack.gateway_url)
    outcome = Outcome()
    cap = Decimal(manifests.HARD_CAP_USD)
    last = CallResult(0)
    while True:
        if outcome.refused_at is None:
            last = agent.review_next_file()
            if last.status == 429:
                outcome.refused_at = time.monotonic()
                outcome.refusal = last.error
        status = _budget_status(stack)
        spent = Decimal(str(status.get("spentUSD", "0")))
        display.spend(spent, cap, str(status.get("phase", "?")), last.model or "-", agent.calls)
        if outcome.soft_limit_seen_at is None and last.model == manifests.CHEAP:
            outcome.soft_limit_seen_at = spent
            display.note(
                f"soft limit passed: the gateway now downgrades {manifests.FRONTIER} → "
                f"{manifests.CHEAP} (rule {last.rule})"
            )
        if outcome.refused_at is not None:
            if _job_suspended(stack):
                outcome.suspended_after = time.monotonic() - outcome.refused_at
                return outcome
            if time.monotonic() - outcome.refused_at > STOP_DEADLINE_SECONDS:
                return outcome
        time.sleep(CALL_INTERVAL_SECONDS)


def _show_final_state(stack: DemoStack, display: Display, outcome: Outcome) -> None:
    display.note(f"hard cap reached: the gateway refuses calls with HTTP 429: {outcome.refusal}")
    if outcome.suspended_after is not None:
        display.note(
            f"job {manifests.JOB} suspended {outcome.suspended_after:.1f} s after the first "
            "refused call (spec.suspend=true; the Job controller removed its pod)"
        )
    # The phase is derived from the spend by the reconciler's next pass (debounced):
    # wait for it so the table below is the settled state, not the moment of the stop.
    wait_until(lambda: _budget_status(stack).get("phase") == "Exhausted", 15, "the phase Exhausted")
    display.step("the result, as kubectl shows it")
    display.detail("$ kubectl get costwarden -A\n" + stack.kubectl("get", "costwarden", "-A"))
    display.detail(
        f"$ kubectl get jobs -n {manifests.DEMO_NAMESPACE}\n"
        + stack.kubectl(
            "get",
            "jobs",
            "-n",
            manifests.DEMO_NAMESPACE,
            "-o",
            "custom-columns=NAME:.metadata.name,SUSPENDED:.spec.suspend,"
            "REASON:.metadata.annotations.costwarden\\.io/stopped-reason",
        )
    )
    events = stack.kubectl(
        "get", "events", "-n", manifests.DEMO_NAMESPACE, "--sort-by=.lastTimestamp",
        "-o", "custom-columns=OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message",
    )  # fmt: skip
    display.detail(f"$ kubectl get events -n {manifests.DEMO_NAMESPACE}\n{events}")
    display.step(f"logs and the usage ledger are in {stack.workdir}")


def needs_build() -> bool:
    if find_kubebuilder_assets() is not None:
        return False
    return bool(missing_binaries(control_plane_cache_dir(), CONTROL_PLANE_BINARIES))


def _custom(stack: DemoStack) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(stack.api)


def _budget_status(stack: DemoStack) -> dict[str, Any]:
    budget: dict[str, Any] = _custom(stack).get_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, manifests.DEMO_NAMESPACE, "teambudgets", manifests.BUDGET
    )
    return dict(budget.get("status") or {})


def _ready(stack: DemoStack, name: str) -> bool:
    conditions = _budget_status(stack).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _job_pod(stack: DemoStack) -> dict[str, Any] | None:
    pods = client.CoreV1Api(stack.api).list_namespaced_pod(
        manifests.DEMO_NAMESPACE, label_selector=f"job-name={manifests.JOB}"
    )
    for pod in pods.items:
        if pod.metadata is not None:
            return {"name": pod.metadata.name, "labels": dict(pod.metadata.labels or {})}
    return None


def _job_suspended(stack: DemoStack) -> bool:
    job = client.BatchV1Api(stack.api).read_namespaced_job(manifests.JOB, manifests.DEMO_NAMESPACE)
    return job.spec is not None and bool(job.spec.suspend)


def _logs(stack: DemoStack) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.logs(tail=15)}" for p in stack.processes)


def _wait_for_interrupt() -> None:
    while True:
        time.sleep(3600)


def summary_json(outcome: Outcome) -> str:
    return json.dumps(outcome.__dict__, default=str)
