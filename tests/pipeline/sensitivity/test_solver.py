"""The solver against brute force on small tables (the exact MILP must find the true optimum)."""

from __future__ import annotations

import itertools
import math

import pytest

from pipeline.formats import WEIGHT_BITS, Format
from pipeline.sensitivity import greedy_sequence, prune_formats, seed_plans
from pipeline.sensitivity.solver import solve_accuracy_budget, solve_bits_budget
from pipeline.sensitivity.table import Cell, LayerCost, SensitivityTable

FMTS = [Format.INT8, Format.INT4]


def _table(drops: dict[str, dict[Format, float]], params: dict[str, int]) -> SensitivityTable:
    total = sum(params.values())
    return SensitivityTable(
        model="t", backend="ort-cpu", device="cpu", metric="accuracy", higher_is_better=True, reference_accuracy=0.9,
        eval_rows=10, eval_label="all 10 rows", formats=FMTS, plan_defaults="",
        cells=[Cell(layer=n, format=f, drop=d) for n, row in drops.items() for f, d in row.items()],
        costs=[LayerCost(layer=n, kind="linear", onnx_op="MatMul", params=p, size_share=p / total,
                         latency_share=p / total) for n, p in params.items()])


TABLE = _table(
    {"a": {Format.INT8: 0.001, Format.INT4: 0.05}, "b": {Format.INT8: 0.0, Format.INT4: 0.004},
     "c": {Format.INT8: 0.002, Format.INT4: 0.010}, "d": {Format.INT8: 0.003, Format.INT4: 0.002}},
    {"a": 100, "b": 400, "c": 200, "d": 300})


def _brute(table, key):
    best = None
    for combo in itertools.product([Format.FP32, *FMTS], repeat=len(table.layers)):
        plan = dict(zip(table.layers, combo))
        drop = sum(max(table.drop(n, f), 0) for n, f in plan.items())
        bits = sum(table.cost(n).params * WEIGHT_BITS[f] for n, f in plan.items()) / 1000
        k = key(drop, bits)
        if k is not None and (best is None or k < best[0]):
            best = (k, plan, drop, bits)
    return best


@pytest.mark.parametrize("avg_bits", [4.0, 5.0, 6.0, 8.0, 12.0])
def test_bits_budget_solve_is_optimal(avg_bits):
    got = solve_bits_budget(TABLE, avg_bits)
    drop = sum(TABLE.drop(n, f) for n, f in got.items())
    bits = sum(TABLE.cost(n).params * WEIGHT_BITS[f] for n, f in got.items()) / 1000
    best = _brute(TABLE, lambda d, b: round(d, 9) if b <= avg_bits + 1e-9 else None)
    assert bits <= avg_bits + 1e-9
    assert drop == pytest.approx(best[2])


@pytest.mark.parametrize("max_drop", [0.0, 0.003, 0.01, 0.02, 1.0])
def test_accuracy_budget_solve_is_the_smallest_feasible_plan(max_drop):
    got = solve_accuracy_budget(TABLE, max_drop)
    bits = sum(TABLE.cost(n).params * WEIGHT_BITS[f] for n, f in got.items()) / 1000
    drop = sum(TABLE.drop(n, f) for n, f in got.items())
    best = _brute(TABLE, lambda d, b: b if d <= max_drop + 1e-12 else None)
    assert drop <= max_drop + 1e-9
    assert bits == pytest.approx(best[3])


def test_groups_get_one_format_and_allowed_formats_are_respected():
    groups = {"ab": ["a", "b"], "cd": ["c", "d"]}
    for plan in seed_plans(TABLE, [4.0, 6.0], max_drop=0.02, groups=groups):
        r = plan.resolve(TABLE.layers)
        assert r["a"].format is r["b"].format and r["c"].format is r["d"].format
    allowed = {"a": [Format.FP32, Format.INT8], "b": [Format.FP32, Format.INT8, Format.INT4],
               "c": [Format.FP32, Format.INT4], "d": [Format.FP32]}
    for plan in seed_plans(TABLE, [4.0, 6.0, 8.0], max_drop=0.05, allowed=allowed):
        for n, c in plan.resolve(TABLE.layers).items():
            assert c.format in allowed[n]


def test_greedy_takes_least_drop_per_bit_first_and_never_adds_bits():
    seq = greedy_sequence(TABLE)
    assert seq[0][0]["b"] is Format.INT8  # a free move (0 drop) comes first
    bits = [s[2] for s in seq]
    assert bits == sorted(bits, reverse=True)
    assert seq[-1][0] == {n: Format.INT4 for n in TABLE.layers}


def test_prune_keeps_fp32_and_unmeasured_formats():
    allowed = prune_formats(TABLE, 0.005, allowed={n: [Format.FP32, Format.BF16, *FMTS] for n in TABLE.layers})
    assert allowed["a"] == [Format.FP32, Format.BF16, Format.INT8]
    assert allowed["b"] == [Format.FP32, Format.BF16, Format.INT8, Format.INT4]
    assert allowed["c"] == [Format.FP32, Format.BF16, Format.INT8]
    failed = TABLE.model_copy(update={"cells": TABLE.cells + [Cell(layer="d", format=Format.BF16, error="x")]})
    assert Format.BF16 not in prune_formats(failed, 0.005, allowed={"d": [Format.FP32, Format.BF16]})["d"]
    assert math.isinf(failed.drop("d", Format.BF16))


def _predicted(table, plan, ratios):
    drop = sum(max(table.drop(n, f), 0) for n, f in plan.items())
    bits = sum(table.cost(n).params * WEIGHT_BITS[f] for n, f in plan.items()) / 1000
    lat = sum(table.cost(n).latency_share * ratios[f] for n, f in plan.items())
    return drop, bits, lat


@pytest.mark.parametrize("max_drop", [0.003, 0.01, 0.05])
def test_speed_plans_are_the_fastest_then_smallest_and_most_accurate_at_each_latency_budget(max_drop):
    """Against brute force over every plan: INT8 runs at half FP32's latency, INT4 slower than FP32 (as
    MatMulNBits can on a CPU), so the fastest plan is INT8-heavy, not the smallest one."""
    from pipeline.sensitivity.solver import predicted_latency, speed_plans
    from pipeline.sensitivity.speed import FormatSpeed

    ratios = {Format.FP32: 1.0, Format.INT8: 0.5, Format.INT4: 1.1}
    speed = FormatSpeed(ratios={Format.INT8: 0.5, Format.INT4: 1.1})
    plans = speed_plans(TABLE, speed, max_drop=max_drop, latency_budgets=[1.2])
    combos = [dict(zip(TABLE.layers, c)) for c in itertools.product([Format.FP32, *FMTS], repeat=len(TABLE.layers))]
    rows = [(c, *_predicted(TABLE, c, ratios)) for c in combos]
    feasible = [r for r in rows if r[1] <= max_drop + 1e-12]
    fastest = min(r[3] for r in feasible)
    got = [_predicted(TABLE, {n: c.format for n, c in p.resolve(TABLE.layers).items()}, ratios) for p in plans]
    assert got[0][2] == pytest.approx(fastest)
    assert predicted_latency(TABLE, speed, plans[0]) == pytest.approx(fastest)
    cap = 1.2 * fastest
    smallest = min(r[2] for r in feasible if r[3] <= cap + 1e-12)
    least_drop = min(r[1] for r in rows if r[3] <= cap + 1e-12)
    assert any(g[1] == pytest.approx(smallest) and g[0] <= max_drop + 1e-9 and g[2] <= cap + 1e-9 for g in got)
    assert any(g[0] == pytest.approx(least_drop) and g[2] <= cap + 1e-9 for g in got)
    assert len({tuple(p.resolve(TABLE.layers)[n].format for n in TABLE.layers) for p in plans}) == len(plans)


def test_speed_plans_leave_out_formats_with_no_measured_ratio_and_need_a_format_faster_than_fp32():
    from pipeline.sensitivity.solver import speed_plans
    from pipeline.sensitivity.speed import FormatSpeed

    only_int8 = FormatSpeed(ratios={Format.INT8: 0.5})  # INT4's baseline failed: no ratio
    plans = speed_plans(TABLE, only_int8, max_drop=0.05)
    assert plans and all(c.format is not Format.INT4 for p in plans for c in p.resolve(TABLE.layers).values())
    # no format faster than FP32 here: the fastest plan is FP32 itself, and no speed plan is worth seeding
    assert speed_plans(TABLE, FormatSpeed(ratios={Format.INT8: 1.0, Format.INT4: 1.0}), max_drop=0.0) == []
