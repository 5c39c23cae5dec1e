"""`make bench-wire`'s combinations: each name means the settings it says, and old runs are reused."""
from __future__ import annotations

import json

import pytest

from bench import runs, wire
from edge_client.trainer import TrainConfig, public_config


def test_combination_names_map_to_settings():
    s = wire.settings("int4-int8grad+fact+kr")
    assert (s["wire_dtype"], s["grad_dtype"], s["factorised"], s["stochastic_rounding"]) == \
        ("int4", "int8", True, False)
    assert (s["kr"].policy, s["kr"].unit, s["kr"].warmup_steps) == ("kr", "site", 20)   # KR's defaults
    steady = wire.settings("int8-sr+kr", kr_steady=True)
    assert steady["stochastic_rounding"] and not steady["factorised"] and steady["kr"].warmup_steps == 1
    assert wire.settings("fp32")["kr"].policy == "all"
    for bad in ("int3", "int8+fast", "fp32+kr+zip"):
        with pytest.raises(SystemExit, match="unknown combination"):
            wire.combos(bad)


def test_runs_from_before_the_new_wire_settings_are_reused(tmp_path):
    """A run.json written before grad_dtype/factorised/stochastic_rounding existed meant none of them."""
    cfg = TrainConfig.of(steps=80, eval_limit=0, **wire.settings("int8+kr"))
    old = public_config(cfg)
    for key in ("grad_dtype", "factorised", "stochastic_rounding"):
        del old[key]
    (tmp_path / "run.json").write_text(json.dumps({"config": old}))
    assert runs.same_run(tmp_path / "run.json", cfg)
    assert not runs.same_run(tmp_path / "run.json", TrainConfig.of(steps=80, eval_limit=0,
                                                                 **wire.settings("int8+fact+kr")))


def test_table_cuts_against_the_baseline_and_predicts_links():
    costs = {"fp32": {"bytes": 400e6, "round_trips": 62, "seconds": 4.0},
             "int8+fact+kr": {"bytes": 4e6, "round_trips": 8, "seconds": 2.0}}
    rows = wire.table(costs, {"int8+fact+kr": {0: {"summary": {"after": {"accuracy": 0.9}}}}}, "fp32")
    best = rows[1]
    assert best["bytes_cut"] == pytest.approx(0.99) and best["accuracy"] == 0.9 and rows[0]["accuracy"] is None
    # 50 ms x 8 round trips + 4 MB at 10 Mbit/s on top of the loopback 2 s.
    assert best["predicted"]["50ms/10Mbit"] == pytest.approx(2.0 + 8 * 0.05 + 4e6 * 8 / 10e6)
