"""policy/leases.py: how much of a team's budget each gateway replica may hold."""

from __future__ import annotations

from decimal import Decimal

from costwarden.policy.leases import LeaseAsk, grant, smaller_need, wanted_lease

D = Decimal


def decide(
    *,
    cap: str = "10",
    spent: str = "0",
    others: dict[str, str] | None = None,
    current: str = "0",
    contended: bool = False,
    **ask: str,
):
    return grant(
        cap=D(cap),
        spent=D(spent),
        others={k: D(v) for k, v in (others or {}).items()},
        current=D(current),
        ask=LeaseAsk(**{k: D(v) for k, v in ask.items()}),
        contended=contended,
    )


def test_an_uncontended_replica_is_lent_a_share_of_half_of_what_is_left():
    result = decide(want="0.5", need="0.1", floor="0.1")
    assert result.amount == D(5)  # left / (2 * 1 holder)
    assert not result.short
    assert result.trip is None


def test_the_sum_of_leases_never_exceeds_what_is_left():
    result = decide(spent="4", others={"b": "5"}, want="3", need="2", floor="1")
    assert result.amount == D(1)  # 10 - 4 - 5
    assert result.short  # the call needs 2
    assert result.trip is None  # 6 is left: another replica's lease may come back
    assert "other gateway replicas hold 5 USD" in result.message


def test_a_call_whose_floor_no_longer_fits_what_is_left_trips_the_cap():
    result = decide(spent="9.95", want="0.2", need="0.1", floor="0.08")
    assert result.short
    assert result.trip == D("0.08")
    assert "hard cap is reached" in result.message


def test_unapplied_usage_counts_against_what_is_left_when_deciding_the_trip():
    # 1 is left in status, but 0.95 of it is already metered by this replica.
    result = decide(
        spent="9", current="1", want="1.1", need="0.1", floor="0.1", in_use="0.95",
        unapplied="0.95",
    )  # fmt: skip
    assert result.trip == D("0.1")
    # The same in flight (reserved, may settle lower): retry, not a trip.
    held = decide(spent="9", current="1", want="1.1", need="0.1", floor="0.1", in_use="0.95")
    assert held.short
    assert held.trip is None


def test_an_oversized_call_is_refused_without_tripping_the_cap_when_its_floor_fits():
    result = decide(spent="5", want="8", need="8", floor="0.05")
    assert result.short
    assert result.trip is None


def test_a_lease_is_never_shrunk_below_what_its_replica_has_in_use():
    result = decide(spent="9", others={"b": "1"}, current="0.6", want="0", in_use="0.4")
    assert result.amount == D("0.4")


def test_contention_bounds_a_grant_to_a_fair_share():
    alone = decide(cap="12", others={"b": "0", "c": "0"}, want="10")
    assert alone.amount == D(10)
    fair = decide(cap="12", others={"b": "0", "c": "0"}, want="10", need="1", contended=True)
    assert fair.amount == D(4)  # 12 / 3 holders


def test_a_renewal_under_contention_gives_back_what_is_not_in_use():
    # Two replicas each holding half of what one call needs would strand the money.
    result = decide(cap="1", others={"b": "0.5"}, current="0.5", want="0.6", in_use="0.1",
                    contended=True)  # fmt: skip
    assert result.amount == D("0.1")
    calm = decide(cap="1", others={"b": "0.5"}, current="0.5", want="0.6", in_use="0.1")
    assert calm.amount == D("0.5")


def test_shares_round_down_to_a_nano_dollar():
    result = decide(cap="1", want="0")
    assert result.amount == D("0.5")
    odd = decide(cap="1", others={"b": "0", "c": "0"}, want="0")
    assert odd.amount == D("0.166666666")  # 1 / 6, floored


def test_over_a_lowered_cap_nothing_new_is_lent():
    result = decide(cap="1", spent="2", current="0.3", want="1", need="0.1", floor="0.1")
    assert result.amount == D(0)
    assert result.trip == D("0.1")


def test_the_smallest_refused_floor_is_kept():
    assert smaller_need(None, D("0.3")) == D("0.3")
    assert smaller_need(D("0.3"), D("0.1")) == D("0.1")
    assert smaller_need(D("0.1"), D("0.3")) == D("0.1")
    assert smaller_need(D("0.1"), None) == D("0.1")


def test_a_replica_asks_for_its_use_the_waiting_call_and_headroom():
    assert wanted_lease(in_use=D(1), need=D("0.5"), recent=D(2)) == D("3.5")
    assert wanted_lease(in_use=D(0), need=D("0.5"), recent=D(0)) == D(1)
