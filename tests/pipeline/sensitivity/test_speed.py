"""Speed ratios from the uniform baselines (pipeline.sensitivity.speed)."""

from __future__ import annotations

import pytest

from pipeline.formats import Format, Int8Activations
from pipeline.sensitivity.speed import BaselineTiming, fastest_int8_mode, format_speed

STATIC, DYNAMIC = Int8Activations.STATIC, Int8Activations.DYNAMIC


def _timings(static_ms=6.0, dynamic_ms=4.0, static_over=False, dynamic_over=False):
    return [BaselineTiming("uniform-fp32", Format.FP32, 8.0),
            BaselineTiming("uniform-int8", Format.INT8, static_ms, static_over, STATIC),
            BaselineTiming("uniform-int8-dynamic", Format.INT8, dynamic_ms, dynamic_over, DYNAMIC),
            BaselineTiming("uniform-int4", Format.INT4, 10.0)]


def test_ratios_are_each_uniform_latency_over_fp32_with_int8_in_its_fastest_mode():
    speed = format_speed(_timings())
    assert speed.int8_activations is DYNAMIC
    assert speed.ratios == {Format.INT8: pytest.approx(0.5), Format.INT4: pytest.approx(1.25)}
    assert speed.ratio(Format.FP32) == 1.0 and speed.ratio(Format.BF16) is None  # no baseline: cannot be judged
    assert "int8 0.50x" in speed.describe() and "int4 1.25x" in speed.describe() and "dynamic" in speed.describe()


def test_a_mode_within_the_accuracy_budget_beats_a_faster_one_outside_it():
    assert fastest_int8_mode(_timings(dynamic_over=True)) is STATIC
    assert format_speed(_timings(dynamic_over=True)).ratios[Format.INT8] == pytest.approx(0.75)
    assert fastest_int8_mode(_timings(static_ms=3.0)) is STATIC
    assert fastest_int8_mode(_timings()[:1]) is None


def test_no_ratio_without_a_timed_fp32_baseline():
    assert format_speed(_timings()[1:]) is None
    assert format_speed([]) is None
    # a baseline with no latency (a failed measurement) gives no ratio
    got = format_speed([*_timings()[:2], BaselineTiming("uniform-int4", Format.INT4, 0.0)])
    assert Format.INT4 not in got.ratios and got.ratios[Format.INT8] == pytest.approx(0.75)


def test_a_baseline_label_names_its_format_and_int8_mode():
    modes = [STATIC, DYNAMIC]
    assert BaselineTiming.from_label("uniform-int8", 5.0, False, modes).int8_activations is STATIC  # first listed
    got = BaselineTiming.from_label("uniform-int8-dynamic", 4.0, True, modes)
    assert (got.format, got.int8_activations, got.latency_ms, got.over_budget) == (Format.INT8, DYNAMIC, 4.0, True)
    assert BaselineTiming.from_label("uniform-int4", 9.0, False, modes).int8_activations is None
    assert BaselineTiming.from_label("uniform-nf3", 9.0, False, modes) is None
