"""Sensitivity measured on the artifact (real quantizer, real ONNX Runtime): ranking, pruning, the
solver's plans, the cache, the proxy check and the outputs, on a model with one fragile layer."""

from __future__ import annotations

import math
import time

import pytest

from pipeline.formats import WEIGHT_BITS, Format
from pipeline.plan import QuantPlan
from pipeline.sensitivity import build_sensitivity, predicted_drop, prune_formats, seed_plans
from tests.pipeline.sensitivity.conftest import EVAL_LIMIT

BUDGET = 0.03


def _avg_bits(plan: QuantPlan, table) -> float:
    choices = plan.resolve(table.layers)
    total = sum(table.cost(n).params for n in table.layers)
    return sum(table.cost(n).params * WEIGHT_BITS[c.format] for n, c in choices.items()) / total


def test_fragile_layer_ranks_first_and_int4_is_pruned_for_it_only(fragile_table):
    t = fragile_table
    assert t.source == "artifact" and t.backend == "ort-cpu"
    assert t.eval_rows == EVAL_LIMIT and "subset" in t.eval_label
    ranking = t.ranking(Format.INT4)
    assert ranking[0][0] == "fc1"
    assert ranking[0][1] > 0.1  # int4 with an outlier in every block: most of fc1's weights round to 0
    assert all(d < ranking[0][1] / 3 for _, d in ranking[1:])
    allowed = prune_formats(t, BUDGET)
    assert Format.INT4 not in allowed["fc1"]
    assert Format.FP32 in allowed["fc1"] and Format.BF16 in allowed["fc1"]
    for n in ("fc2", "fc3", "fc4"):
        if t.drop(n, Format.INT4) <= BUDGET:
            assert Format.INT4 in allowed[n]
    # every cell carries the backend's verdict for the layer: bf16 is emulated on ORT CPU
    assert t.cell("fc1", Format.BF16).execution == "emulated"
    assert t.cell("fc2", Format.INT8).execution in ("native", "emulated")


def test_solver_keeps_the_fragile_layer_precise_within_the_bits_budget(fragile_table):
    t = fragile_table
    budgets = [6.0, 8.0]
    plans = seed_plans(t, budgets, max_drop=BUDGET, greedy=3)
    assert len(plans) >= 3
    for plan in plans:
        assert plan.resolve(t.layers)["fc1"].format is not Format.INT4, plan.summary(t.layers)
        assert predicted_drop(t, plan) <= BUDGET + 1e-9 or _avg_bits(plan, t) <= max(budgets)
    by_budget = seed_plans(t, budgets, max_drop=None, greedy=0)
    for plan in by_budget:
        assert _avg_bits(plan, t) <= max(budgets) + 1e-9
    assert min(_avg_bits(p, t) for p in by_budget) <= 6.0 + 1e-9
    # the skip screen: uniform int4 cannot meet the budget, uniform int8 (per the table) can
    assert predicted_drop(t, QuantPlan.uniform("int4")) > BUDGET
    assert predicted_drop(t, QuantPlan.uniform("fp32")) == 0.0


def test_second_run_reads_the_cache_and_a_new_format_set_does_not(fragile_config, fragile_table):
    start = time.perf_counter()
    again = build_sensitivity(fragile_config, eval_limit=EVAL_LIMIT)
    assert again.from_cache and time.perf_counter() - start < 5
    assert again.cache_key == fragile_table.cache_key
    assert [c.drop for c in again.cells] == [c.drop for c in fragile_table.cells]
    other = build_sensitivity(fragile_config, eval_limit=EVAL_LIMIT, formats=[Format.INT4], layers=["fc1", "fc4"])
    assert not other.from_cache and other.cache_key != fragile_table.cache_key
    assert other.drop("fc1", "int4") == pytest.approx(fragile_table.drop("fc1", "int4"))


def test_proxy_is_checked_against_the_artifact(fragile_table):
    check = fragile_table.proxy
    assert check is not None and check.cells == len(fragile_table.cells)
    assert check.spearman is not None and -1 <= check.spearman <= 1
    int4 = {n: s["int4"] for n, s in check.scores.items()}
    assert max(int4, key=int4.get) == "fc1"  # the proxy sees the outlier too
    assert check.spearman > 0


def test_proxy_mode_measures_a_few_layers_and_fills_the_rest(fragile_config):
    t = build_sensitivity(fragile_config, eval_limit=100, formats=[Format.INT8, Format.INT4], mode="proxy",
                          check_layers=2)
    assert t.source == "proxy"
    assert len(t.proxy.layers) == 2
    assert {(c.layer, c.format) for c in t.cells} == {(n, f) for n in t.layers for f in (Format.INT8, Format.INT4)}
    assert all(math.isfinite(t.drop(n, "int4")) for n in t.layers)
    assert t.ranking("int4")[0][0] == "fc1"


def test_costs_use_observed_shapes_for_convolutions(cnn_config):
    """A Conv's MACs count its output positions: conv layers weigh more in latency than in size."""
    from pipeline.sensitivity.costs import LATENCY_FROM_SHAPES, layer_costs
    from pipeline.sensitivity.measure import evaluator_class, subset_config
    from pipeline.sensitivity.probe import probe_reference

    ev = evaluator_class()(subset_config(cnn_config, 64))
    table = ev.reference.layer_table
    costs, label = layer_costs(table, probe_reference(ev.reference.onnx_path, table, ev.calibration_feeds()))
    assert label == LATENCY_FROM_SHAPES
    assert sum(c.size_share for c in costs) == pytest.approx(1.0)
    assert sum(c.latency_share for c in costs) == pytest.approx(1.0)
    convs = [c for c in costs if c.onnx_op == "Conv"]
    assert convs and all(c.macs > c.params for c in convs)
    assert sum(c.latency_share for c in convs) > sum(c.size_share for c in convs)
