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


def test_classification_builtins_match_sklearn():
    from sklearn.metrics import f1_score, top_k_accuracy_score

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 7))
    y = rng.integers(0, 7, size=300)
    assert compute_metric("top_k_accuracy", 0, {"o": logits}, y, k=3) == pytest.approx(
        top_k_accuracy_score(y, logits, k=3, labels=range(7)))
    assert compute_metric("macro_f1", 0, {"o": logits}, y) == pytest.approx(
        f1_score(y, logits.argmax(1), average="macro"))
    binary = rng.normal(size=(300, 2))
    yb = rng.integers(0, 2, size=300)
    assert compute_metric("f1", 0, {"o": binary}, yb) == pytest.approx(f1_score(yb, binary.argmax(1)))
    one_logit = rng.normal(size=(300, 1))  # one logit per row: positive when > 0
    assert compute_metric("accuracy", 0, {"o": one_logit}, yb) == pytest.approx(
        np.mean((one_logit[:, 0] > 0) == yb))
    with pytest.raises(ValueError, match="f1 is binary"):
        compute_metric("f1", 0, {"o": logits}, y)
    with pytest.raises(ValueError, match="one label per output row: 300 rows but 5"):
        compute_metric("accuracy", 0, {"o": logits}, y[:5])


def test_regression_builtins_match_sklearn_and_declare_direction():
    from sklearn.metrics import mean_absolute_error, r2_score

    from pipeline.metrics import BUILTIN_METRICS

    rng = np.random.default_rng(2)
    t = rng.normal(size=(50, 3))
    o = t + rng.normal(scale=0.3, size=(50, 3))
    assert compute_metric("mae", 0, {"o": o}, t) == pytest.approx(mean_absolute_error(t.ravel(), o.ravel()))
    assert compute_metric("r2", 0, {"o": o}, t) == pytest.approx(r2_score(t.ravel(), o.ravel()))
    assert [BUILTIN_METRICS[n].higher_is_better for n in ("mse", "mae", "r2", "pearson")] == [False, False, True, True]


def _pair_data(n=40, dim=16, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim))
    b = a + rng.normal(scale=rng.uniform(0.1, 2.0, size=(n, 1)), size=(n, dim))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    gold = cos + rng.normal(scale=0.05, size=n)
    return a, b, cos, gold


def test_pair_spearman_and_pearson_on_embeddings_in_every_layout():
    from scipy.stats import pearsonr

    a, b, cos, gold = _pair_data()
    want = spearmanr(cos, gold).statistic
    halves = np.concatenate([a, b])
    inter = np.stack([a, b], axis=1).reshape(-1, a.shape[1])
    assert compute_metric("spearman", "e", {"e": halves}, gold, pairs="halves") == pytest.approx(want)
    assert compute_metric("spearman", "e", {"e": inter}, gold, pairs="interleaved") == pytest.approx(want)
    # explicit row indices: each sentence embedded once, used by several pairs
    idx = np.stack([np.arange(40), np.arange(40) + 40], axis=1)
    targets = {"pairs": idx[::-1], "scores": gold[::-1]}
    assert compute_metric("spearman", "e", {"e": halves}, targets) == pytest.approx(want)
    assert compute_metric("pearson", "e", {"e": halves}, gold, pairs="halves") == pytest.approx(
        pearsonr(cos, gold).statistic)
    # the wrong layout gives another number (so the layout is asked for, never guessed)
    assert compute_metric("spearman", "e", {"e": inter}, gold, pairs="halves") != pytest.approx(want)
    with pytest.raises(ValueError, match="set metric.pairs"):
        compute_metric("spearman", "e", {"e": halves}, gold)
    with pytest.raises(ValueError, match="two output rows per gold score"):
        compute_metric("spearman", "e", {"e": halves[:-1]}, gold, pairs="halves")
    with pytest.raises(ValueError, match="targets.pairs index rows"):
        compute_metric("spearman", "e", {"e": halves}, {"pairs": idx + 100, "scores": gold})


def test_custom_metric_gets_structured_targets_and_kwargs():
    out = {"scores": np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])}
    relevant = {0: [0], 1: [2]}  # query -> relevant ids: not one target per row
    assert compute_metric("tests.pipeline.test_metrics:_recall_at", 0, out, relevant, k=1) == pytest.approx(0.5)
    assert compute_metric("tests.pipeline.test_metrics:_recall_at", 0, out, relevant, k=2) == pytest.approx(1.0)


def _recall_at(outputs, targets, k):
    top = np.argsort(-outputs["scores"], axis=1)[:, :k]
    return float(np.mean([bool(set(top[q]) & set(rel)) for q, rel in targets.items()]))


def test_task_metric_turns_a_raising_metric_into_one_named_error():
    from pipeline.config import parse_config
    from pipeline.measure import MetricError, TrialFailure, task_metric

    def cfg(metric):
        return parse_config({"name": "t", "model": {"factory": "pipeline.examples.digits:mlp"},
                             "data": {"calibration": {"source": "pipeline.examples.digits:mlp_calibration"},
                                      "eval": {"source": "pipeline.examples.digits:mlp_eval"}},
                             "metric": metric})

    out = {"logits": np.zeros((4, 3), np.float32)}
    with pytest.raises(MetricError, match=r"(?s)metric.name: accuracy raised ValueError: .*4 rows but 2.*"
                                          r"outputs \{logits \(4, 3\) float32\} and targets array \(2,\)"):
        task_metric(cfg({"name": "accuracy"}), out, np.zeros(2, np.int64))
    with pytest.raises(MetricError, match=r"metric.name: .*_returns_text raised TypeError: .* returned str 'good'; a metric returns one float"):
        task_metric(cfg({"name": "tests.pipeline.test_metrics:_returns_text", "higher_is_better": True}),
                    out, None)
    with pytest.raises(TrialFailure, match="non-finite"):
        task_metric(cfg({"name": "accuracy"}), {"logits": np.full((4, 3), np.nan, np.float32)}, np.zeros(4))
    assert task_metric(cfg({"name": "top_k_accuracy", "k": 3}), out, np.array([0, 1, 2, 2])) == 1.0


def _returns_text(outputs, targets):
    return "good"
