"""The cost model behind spec's choices: the curve interpolates the measured table; a prepared
model's table is measured once on this machine, then read back (a corrupt file is re-measured),
and nothing is measured for unprepared models."""

import json

import pytest

from blockdiff import costs
from blockdiff.runtime import prepare
from tests.test_runtime import on_grid_model


def test_the_curve_interpolates_in_log2_and_extends_past_the_widest():
    c = costs.curve({1: 4.0, 2: 5.0, 4: 6.0, 8: 8.0, 16: 12.0, 32: 20.0})
    assert c(1) == 1.0 and c(8) == 2.0 and c(32) == 5.0
    assert c(4) < c(6) < c(8) and c(6) == pytest.approx((6 + (8 - 6) * 0.5849625) / 4)
    assert c(48) == pytest.approx((20 + 0.5 * 16) / 4)  # the last segment's slope


def test_a_prepared_model_is_measured_once_then_read(tmp_path, monkeypatch):
    monkeypatch.setattr(costs, "cache_dir", lambda: tmp_path)
    model = on_grid_model()
    assert costs.forward_cost(model) is None  # unprepared: nothing to measure
    model = prepare(model, "bfloat16")
    calls = []
    real = costs.measure
    monkeypatch.setattr(costs, "measure", lambda m: calls.append(1) or real(m, rounds=1))
    c = costs.forward_cost(model)
    table = json.loads((tmp_path / "costs.json").read_text())
    assert len(calls) == 1 and len(table) == 1
    (ms,) = table.values()
    assert set(ms) == {str(n) for n in costs.WIDTHS} and all(v > 0 for v in ms.values())
    assert c(1) == 1.0 and c(32) == pytest.approx(ms["32"] / ms["1"])
    model.__dict__.pop("_costs", None)  # a new process: read back, not measured
    assert costs.forward_cost(model)(32) == c(32) and len(calls) == 1
    other = prepare(on_grid_model(), "float32")  # another model: kept beside the first
    costs.forward_cost(other)
    assert len(calls) == 2 and len(json.loads((tmp_path / "costs.json").read_text())) == 2
    (tmp_path / "costs.json").write_text("{not json")  # corrupt: measured again, rewritten
    model.__dict__.pop("_costs", None)
    costs.forward_cost(model)
    assert len(calls) == 3 and len(json.loads((tmp_path / "costs.json").read_text())) == 1
