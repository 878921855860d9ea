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
