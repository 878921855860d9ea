"""The demo's own team: a small budget, so the agent reaches the caps within seconds."""

from __future__ import annotations

from typing import Any

DEMO_NAMESPACE = "costwarden-demo"
OPERATOR_NAMESPACE = "costwarden-system"
BUDGET = "demo-team"
POLICY = "demo-routing"
JOB = "demo-agent"
HARD_CAP_USD = "0.20"
SOFT_LIMIT_PERCENT = 30
# Well below the cap: a frontier code-review call reserves its worst case (the body's bytes
# as tokens at gpt-4.1's prices, about $0.075 here, over a third of the cap) before it is
# forwarded. The downgrade must start while a frontier worst case still fits, or the cap
# trips on the frontier model before the downgrade is seen.
FRONTIER, CHEAP = "gpt-4.1", "gpt-4.1-mini"
AGENT_LABELS = {"costwarden.io/agent": "true", "app.kubernetes.io/part-of": "costwarden-demo"}


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}}


def routing_policy(upstream_url: str) -> dict[str, Any]:
    """Frontier model for code review with tools, a cheap one otherwise and past the soft
    limit; both served by the local upstream, priced from the catalogue. The upstream runs
    beside the cluster on a local address, so the models are InCluster: an External model
    may not live on a loopback or private address (api/endpoints.py)."""
    models = [
        {
            "name": name,
            "provider": "OpenAI",
            "endpoint": f"{upstream_url}/v1",
            "locality": "InCluster",
        }
        for name in (FRONTIER, CHEAP)
    ]
    return {
        "apiVersion": "costwarden.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": POLICY, "namespace": DEMO_NAMESPACE},
        "spec": {
            "models": models,
            "defaultModel": CHEAP,
            "rules": [
                {
                    "name": "code-review",
                    "match": {"tasks": ["code-review"], "hasTools": True},
                    "model": FRONTIER,
                    "fallbacks": [CHEAP],
                }
            ],
            "softLimitDowngrades": [{"from": FRONTIER, "to": CHEAP}],
            # What a call that sets no max_tokens reserves (and is held to): the demo's
            # cap is a few cents, so its agent's calls are kept short.
            "defaultMaxOutputTokens": 512,
        },
    }


def team_budget() -> dict[str, Any]:
    return {
        "apiVersion": "costwarden.io/v1alpha1",
        "kind": "TeamBudget",
        "metadata": {"name": BUDGET, "namespace": DEMO_NAMESPACE},
        "spec": {
            "workloads": {"selector": {"matchLabels": {"costwarden.io/agent": "true"}}},
            "period": {"schedule": "Daily", "timeZone": "UTC"},
            "hardCapUSD": HARD_CAP_USD,
            "softLimit": {"percent": SOFT_LIMIT_PERCENT},
            # The demo agent varies its prompts: loop detection stays quiet.
            "loopDetection": {"identicalRequests": 5, "windowSeconds": 60},
            "onHardCap": {"requests": "Block", "jobs": "Suspend"},
            "routingPolicyRef": {"name": POLICY},
        },
    }


def agent_job() -> dict[str, Any]:
    """The agent's Job. Without a kubelet its pod stays Pending; the agent's calls are
    made by the demo on the pod's behalf, through the gateway acting as its sidecar."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": JOB, "namespace": DEMO_NAMESPACE, "labels": AGENT_LABELS},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": AGENT_LABELS},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "agent",
                            "image": "busybox:1.36",
                            "command": ["sleep", "3600"],
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": 65532,
                                "allowPrivilegeEscalation": False,
                            },
                        }
                    ],
                },
            },
        },
    }
