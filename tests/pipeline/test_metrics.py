from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from pipeline.metrics import accuracy_drop, compute_metric


def test_accuracy_over_all_rows():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert compute_metric("accuracy", 0, {"out": logits}, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_spearman_is_computed_on_the_whole_set_not_per_batch():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    gold = scores + rng.normal(scale=0.5, size=200)
    whole = compute_metric("spearman", "s", {"s": scores}, gold)
    assert whole == pytest.approx(spearmanr(scores, gold).statistic)
    per_batch = np.mean([spearmanr(scores[i:i + 8], gold[i:i + 8]).statistic for i in range(0, 200, 8)])
    assert abs(whole - per_batch) > 1e-3  # the two differ, so the whole-set path matters


def test_mse_and_custom_metric_receives_all_outputs():
    out = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 5.0])}
    assert compute_metric("mse", "a", out, np.array([1.0, 4.0])) == pytest.approx(2.0)
    assert compute_metric("tests.pipeline.test_metrics:_sum_metric", 0, out, np.zeros(2)) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="not a model output"):
        compute_metric("mse", "c", out, np.zeros(2))


def _sum_metric(outputs, targets):
    return float(sum(v.sum() for v in outputs.values()))


def test_accuracy_drop_sign_follows_direction():
    assert accuracy_drop(0.9, 0.85, True) == pytest.approx(0.05)
    assert accuracy_drop(0.10, 0.12, False) == pytest.approx(0.02)
