"""What one namespace's sidecars may know of the gateway configuration (pure, no I/O).

A sidecar's configuration copy lives in a tenant's namespace, where every pod and person of
that tenant can read it. It holds only the teams that govern the namespace (each team's
``namespaces``, as the render resolved them) and the routing policies those teams use:
never another team's spend, caps or endpoints.
"""

from __future__ import annotations

from costwarden.api.gatewayconfig import GatewayConfig


def config_for_namespace(config: GatewayConfig, namespace: str) -> GatewayConfig:
    """``config`` cut down to the part governing ``namespace``; the revision is kept (it
    names the operator's render the part comes from)."""
    teams = [team for team in config.teams if namespace in team.namespaces]
    used = {team.routing_policy for team in teams if team.routing_policy}
    policies = [policy for policy in config.policies if policy.id in used]
    return config.model_copy(update={"teams": teams, "policies": policies})
