"""The overspend benchmark's pure parts (benchmarks/overspend.py): the bill, the overspend,
the table it prints and the LiteLLM configuration it writes."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import yaml
from benchmarks.overspend import PRICES, Outcome, Prices, litellm_config, table


def test_bill_is_exact_tokens_times_prices() -> None:
    prices = Prices(input_per_m=Decimal("2.50"), output_per_m=Decimal("10.00"))
    # 17 prompt tokens at $2.50/M and 4096 output tokens at $10/M, no float rounding.
    assert prices.bill(17, 4096) == Decimal("0.0410025")
    assert prices.bill(0, 0) == 0


def test_litellm_per_token_price_is_the_same_price_written_out() -> None:
    assert PRICES.per_token(PRICES.input_per_m) == "0.0000025"
    assert PRICES.per_token(PRICES.output_per_m) == "0.00001"


def _outcome(billed: str, rounds: list[dict[int, int]]) -> Outcome:
    return Outcome("t", "e", Decimal(1), rounds=rounds, billed=Decimal(billed))


def test_overspend_is_what_the_upstream_billed_beyond_the_cap() -> None:
    over = _outcome("4.1002", [{200: 100}, {429: 100}])
    assert over.admitted == 100
    assert over.refused == 100
    assert over.overspend == Decimal("3.1002")
    assert over.overspend_pct == Decimal("310.02")


def test_spend_under_the_cap_is_no_overspend() -> None:
    under = _outcome("0.984", [{200: 24, 429: 76}, {429: 100}])
    assert under.overspend == 0
    assert under.overspend_pct == 0
    assert under.summary()["overspend_usd"] == "0"


def test_a_call_without_an_answer_is_not_counted_admitted() -> None:
    outcome = _outcome("0", [{200: 3, 0: 2, 422: 5}])
    assert outcome.admitted == 3
    assert outcome.refused == 7
    assert outcome.summary()["rounds"] == [{"0": 2, "200": 3, "422": 5}]


def test_table_puts_targets_side_by_side() -> None:
    rows = table([_outcome("0.984", [{200: 24}]), _outcome("4.1002", [{200: 100}])])
    lines = rows.splitlines()
    assert lines[0].startswith("| target | calls admitted |")
    assert len(lines) == 4
    assert lines[2] == "| t | 24 | 1 | $0.984000 | — | $1.000000 | $0.000000 | 0.0 % |"
    assert "| $3.100200 | 310.0 % |" in lines[3]


def test_litellm_is_given_the_same_prices_and_the_variant_setting(tmp_path: Path) -> None:
    config = yaml.safe_load(
        litellm_config(tmp_path, "http://127.0.0.1:9", Decimal(1), "litellm_strict").read_text()
    )
    deployment = config["model_list"][0]
    for section in (deployment["litellm_params"], deployment["model_info"]):
        assert Decimal(str(section["input_cost_per_token"])) * 1_000_000 == PRICES.input_per_m
        assert Decimal(str(section["output_cost_per_token"])) * 1_000_000 == PRICES.output_per_m
    assert "max_output_tokens" not in deployment["model_info"]
    assert config["general_settings"]["fail_closed_budget_enforcement"] is True
    assert config["general_settings"]["custom_auth_run_common_checks"] is True
    assert (tmp_path / "bench_auth.py").exists()


def test_litellm_max_output_tokens_is_declared_when_asked(tmp_path: Path) -> None:
    path = litellm_config(tmp_path, "http://127.0.0.1:9", Decimal(1), "litellm", 32768)
    config = yaml.safe_load(path.read_text())
    assert config["model_list"][0]["model_info"]["max_output_tokens"] == 32768
    assert "fail_closed_budget_enforcement" not in config["general_settings"]
