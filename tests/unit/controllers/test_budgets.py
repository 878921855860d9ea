from costwarden.controllers.budgets import BudgetIndex
from costwarden.controllers.world import ObservedWorld


def _budget(name: str, **spec):
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": name, "generation": 1},
        "spec": {"hardCapUSD": 5, **spec},
    }


def test_a_budget_without_a_real_time_zone_is_left_out_of_accounting():
    world = ObservedWorld()
    world.apply("budget", "ADDED", _budget("good"))
    world.apply("budget", "ADDED", _budget("mars", period={"timeZone": "Mars/Olympus"}))
    index = BudgetIndex(world)
    assert [b.id for b in index.all()] == ["ns/good"]
    assert index.get("ns/mars") is None


def _in(namespace: str, name: str, **spec):
    return {
        "metadata": {"namespace": namespace, "name": name, "uid": name, "generation": 1},
        "spec": {"hardCapUSD": 5, **spec},
    }


def _namespace(name: str, budget: str | None = None):
    annotations = {"costwarden.io/budget": budget} if budget else {}
    return {"metadata": {"name": name, "annotations": annotations}}


def _job(namespace: str, **labels: str):
    return {"metadata": {"namespace": namespace, "name": "j", "labels": labels}}


def test_budgets_govern_only_consenting_namespaces_and_follow_consent_changes():
    world = ObservedWorld()
    world.apply("budget", "ADDED", _in("platform", "all", workloads={"namespaces": ["batch"]}))
    world.apply("budget", "ADDED", _in("attacker", "grab", workloads={"namespaces": ["victim"]}))
    index = BudgetIndex(world)
    # Nothing consents: each governs its own namespace only (a claim never lifts a cap).
    assert index.get("platform/all").namespaces == ["platform"]
    assert index.get("attacker/grab").namespaces == ["attacker"]
    assert index.for_job(_job("victim")) is None
    assert index.for_job(_job("batch")) is None

    world.changed.clear()
    world.apply("namespace", "ADDED", _namespace("victim"))  # no consent: nothing changes
    assert not world.changed.is_set()
    world.apply("namespace", "MODIFIED", _namespace("batch", "platform/all"))
    assert world.changed.is_set()
    assert index.get("platform/all").namespaces == ["batch"]
    assert index.for_job(_job("batch")).id == "platform/all"

    world.apply("namespace", "MODIFIED", _namespace("batch"))  # consent withdrawn
    assert index.get("platform/all").namespaces == ["platform"]
    assert index.for_job(_job("batch")) is None


def test_the_namespaces_own_budget_wins_its_jobs():
    world = ObservedWorld()
    world.apply("namespace", "ADDED", _namespace("batch", "platform/all"))
    world.apply("budget", "ADDED", _in("platform", "all", workloads={"namespaces": ["batch"]}))
    world.apply("budget", "ADDED", _in(
        "batch", "own", workloads={"selector": {"matchLabels": {"team": "batch"}}}
    ))  # fmt: skip
    index = BudgetIndex(world)
    assert index.for_job(_job("batch", team="batch")).id == "batch/own"
    assert index.for_workload("batch", {"team": "other"}).id == "platform/all"


def test_a_relist_replaces_the_consents():
    world = ObservedWorld()
    world.apply("namespace", "ADDED", _namespace("batch", "platform/all"))
    world.replace([], [], [_namespace("other", "platform/all"), _namespace("batch")])
    assert world.consents == {"other": "platform/all"}
