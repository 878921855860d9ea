"""`costwarden validate --allowed-provider-host`: the operator's allow-list, offline."""

from __future__ import annotations

from tests.support.manifests import EXAMPLES_DIR


def test_examples_pass_when_their_providers_are_allowed(cli) -> None:
    run = cli(
        "validate", "--allowed-provider-host", "api.openai.com,*.anthropic.com", str(EXAMPLES_DIR)
    )
    assert run.code == 0, run.out


def test_an_external_host_outside_the_list_names_the_endpoint(cli) -> None:
    run = cli(
        "validate", "-o", "json", "--allowed-provider-host", "api.openai.com", str(EXAMPLES_DIR)
    )

    assert run.code == 1
    problems = [p for p in run.json()["problems"] if p["kind"] == "RoutingPolicy"]
    assert [p["field"] for p in problems] == ["spec.models[2].endpoint", "spec.models[3].endpoint"]
    assert all("'api.anthropic.com'" in p["message"] for p in problems)
    assert all("(api.openai.com)" in p["message"] for p in problems)


def test_in_cluster_models_are_not_subject_to_the_list(cli) -> None:
    # examples' vllm model is InCluster at vllm.ai-platform.svc.cluster.local: not reported.
    run = cli(
        "validate", "-o", "json", "--allowed-provider-host", "api.openai.com", str(EXAMPLES_DIR)
    )
    assert not [p for p in run.json()["problems"] if p["field"] == "spec.models[4].endpoint"]


def test_a_url_is_not_a_provider_host(cli) -> None:
    run = cli("validate", "--allowed-provider-host", "https://api.openai.com", str(EXAMPLES_DIR))
    assert run.code == 2
    assert "neither a host name nor *.suffix" in run.err
