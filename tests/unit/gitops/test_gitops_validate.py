"""`costwarden validate`: the operator's and the API server's verdict, offline, per file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.support.invalid_sets import BrokenSet, broken_sets
from tests.support.manifests import EXAMPLES_DIR, INVALID_DIR, BrokenManifest, broken_manifests

CASES = broken_manifests()
SETS = broken_sets()


def test_examples_are_valid(cli):
    run = cli("validate", str(EXAMPLES_DIR))
    assert run.code == 0, run.out
    assert run.out == "valid: 3 costwarden objects\n"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_each_broken_manifest_gets_exactly_one_precise_message(cli, case: BrokenManifest):
    run = cli("validate", "--output", "json", str(case.path))
    assert run.code == 1
    problems = run.json()["problems"]
    assert len(problems) == 1, problems
    [problem] = problems
    assert problem["field"] == case.field
    assert case.python_message.lower() in problem["message"].lower()
    assert problem["file"] == str(case.path)
    assert problem["document"] == 1
    assert problem["kind"] == case.kind
    assert problem["name"] == case.document["metadata"]["name"]
    assert problem["namespace"] == "default"


def test_the_whole_invalid_folder_fails_with_one_message_per_file(cli):
    run = cli("validate", "-o", "json", str(INVALID_DIR))
    assert run.code == 1
    files = [p["file"] for p in run.json()["problems"]]
    assert sorted(files) == sorted(str(c.path) for c in CASES)


@pytest.mark.parametrize("case", SETS, ids=lambda c: c.id)
def test_each_broken_set_gets_exactly_one_precise_message(cli, case: BrokenSet):
    run = cli("validate", "-o", "json", "--namespace", "team-x", str(case.path))
    assert run.code == 1
    problems = run.json()["problems"]
    assert len(problems) == 1, problems
    [problem] = problems
    assert (problem["kind"], problem["name"]) == (case.kind, case.name)
    assert problem["field"] == case.field
    assert case.message_in("team-x") in problem["message"]


def test_the_sets_are_new_mistakes():
    assert len(SETS) >= 5
    assert len({(s.field, s.message) for s in SETS}) == len(SETS)


def test_text_output_names_file_line_document_object_and_field(cli):
    case = next(c for c in CASES if c.field == "spec.rules[0].match.minPromptTokens")
    run = cli("validate", str(case.path))
    first = run.out.splitlines()[0]
    line = _line_of(case.path, "minPromptTokens")
    assert first.startswith(f"{case.path}:{line}: document 1: RoutingPolicy default/")
    assert ": spec.rules[0].match.minPromptTokens: minPromptTokens must not exceed" in first
    assert run.out.splitlines()[-1] == "invalid: 1 problem in 1 costwarden object"


def test_a_missing_field_is_reported_at_its_parent(cli):
    case = next(c for c in CASES if c.id.startswith("01-"))
    problem = cli("validate", "-o", "json", str(case.path)).json()["problems"][0]
    assert problem["line"] == _line_of(case.path, "spec:")


def test_github_output_is_one_annotation_per_problem(cli):
    case = next(c for c in CASES if c.field == "spec.models[0].endpoint")
    run = cli("validate", "--output", "github", str(case.path))
    annotation = run.out.splitlines()[0]
    line = _line_of(case.path, "endpoint:")
    assert annotation.startswith(f"::error file={case.path},line={line},title=RoutingPolicy ")
    assert "%3A spec.models[0].endpoint::must be an absolute http or https URL" in annotation


def test_references_outside_the_set_can_be_assumed_or_allowed(cli, tmp_path: Path):
    budget = tmp_path / "budget.yaml"
    budget.write_text(
        "apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\n"
        "metadata: {name: b, namespace: team}\n"
        "spec: {hardCapUSD: 5, routingPolicyRef: {name: shared, namespace: platform}}\n"
    )
    assert cli("validate", str(budget)).code == 1
    assert cli("validate", "--assume-exists", "platform/other", str(budget)).code == 1
    assert cli("validate", "--assume-exists", "platform/shared", str(budget)).code == 0
    assert cli("validate", "--allow-external-refs", str(budget)).code == 0


def test_a_policy_in_the_set_satisfies_the_reference_across_files(cli, tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "policy.yaml").write_text(
        (EXAMPLES_DIR / "10-routingpolicy-standard.yaml").read_text()
    )
    (tmp_path / "budget.yaml").write_text((EXAMPLES_DIR / "21-teambudget-support.yaml").read_text())
    assert cli("validate", str(tmp_path)).code == 0


def test_stdin_reads_helm_template_and_kustomize_style_streams(cli, monkeypatch):
    stream = (
        "---\n# Source: costwarden/templates/services.yaml\napiVersion: v1\nkind: Service\n"
        "metadata: {name: gw}\n---\n# Source: budgets/templates/budget.yaml\n"
        + (EXAMPLES_DIR / "10-routingpolicy-standard.yaml").read_text()
        + "\n---\napiVersion: v1\nkind: List\nitems:\n"
        "  - apiVersion: costwarden.io/v1alpha1\n    kind: TeamBudget\n"
        "    metadata: {name: listed, namespace: ns}\n    spec: {hardCapUSD: 1.5}\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(stream))
    run = cli("validate", "-o", "json", "-")
    assert run.code == 1
    [problem] = run.json()["problems"]
    assert problem["file"] == "<stdin>"
    assert problem["name"] == "listed"
    assert problem["field"] == "spec.hardCapUSD"
    assert problem["line"] == stream.splitlines().index("    spec: {hardCapUSD: 1.5}") + 1
    assert [o["kind"] for o in run.json()["objects"]] == ["RoutingPolicy", "TeamBudget"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("apiVersion: costwarden.io/v1\nkind: TeamBudget\nmetadata: {name: a}\n"
         "spec: {hardCapUSD: 1}\n", "apiVersion"),
        ("apiVersion: costwarden.io/v1alpha1\nkind: TeamBudgets\nmetadata: {name: a}\n"
         "spec: {hardCapUSD: 1}\n", "kind"),
        ("apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\nmetadata: {}\n"
         "spec: {hardCapUSD: 1}\n", "metadata.name"),
        ("apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\nmetadata: {name: Bad_Name}\n"
         "spec: {hardCapUSD: 1}\n", "metadata.name"),
        ("apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\nmetadata: {name: a}\n",
         "spec"),
        ("apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\nmetadata: {name: a}\n"
         "spec: {hardCapUSD: 1}\nspecs: {}\n", "specs"),
    ],
)  # fmt: skip
def test_envelope_mistakes_name_their_field(cli, tmp_path: Path, text: str, field: str):
    path = tmp_path / "object.yaml"
    path.write_text(text)
    run = cli("validate", "-o", "json", str(path))
    assert run.code == 1
    assert [p["field"] for p in run.json()["problems"]] == [field]


def test_unreadable_input_exits_2(cli, tmp_path: Path):
    assert cli("validate", str(tmp_path / "missing.yaml")).code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    run = cli("validate", str(broken))
    assert run.code == 2
    assert "broken.yaml" in run.err


def test_a_folder_without_costwarden_objects_is_valid(cli, tmp_path: Path):
    (tmp_path / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    run = cli("validate", str(tmp_path))
    assert (run.code, run.out) == (0, "valid: 0 costwarden objects\n")


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line and not line.startswith("#"))


def test_a_consented_budget_and_the_namespaces_own_are_no_overlap(cli, tmp_path):
    # The own budget wins its namespace's workloads (policy.tenancy.attribute): not ambiguous.
    (tmp_path / "set.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: batch\n"
        "  annotations: {costwarden.io/budget: platform/all}\n---\n"
        "apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\n"
        "metadata: {name: all, namespace: platform}\n"
        "spec: {hardCapUSD: 10, workloads: {namespaces: [platform, batch]}}\n---\n"
        "apiVersion: costwarden.io/v1alpha1\nkind: TeamBudget\n"
        "metadata: {name: own, namespace: batch}\nspec: {hardCapUSD: 5}\n"
    )
    run = cli("validate", "-o", "json", str(tmp_path))
    assert run.code == 0, run.out
