"""Early pruning on the eval screen: whole canonical batches first, so a trial that goes on reports exactly what
an unscreened pass reports, and one that is ruled out ends as TrialPruned with its reason."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.data import Dataset
from pipeline.evaluation import Evaluator
from pipeline.evaluation.screen import build_screen
from pipeline.measure import TrialPruned
from pipeline.metrics import pair_scores
from pipeline.plan import QuantPlan
from pipeline.search.worker import TrialTask, run_trial
from tests.conftest import ROOT, _config

SCREENED = {"search.screen.min_rows": 100, "search.screen.fraction": 0.25, "measure.eval_batch_size": 32}


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    return Evaluator(_config("digits_mlp.yaml", tmp_path_factory.mktemp("screen"), **SCREENED))


def test_the_screen_is_whole_canonical_batches_and_rebuilds_the_full_order():
    ds = Dataset({"x": np.arange(103.0)[:, None]}, np.arange(103), True)
    sc = build_screen(ds, 10, None, 0.25)
    assert sc.first.tolist() == list(range(30))  # ceil(26 / 10) whole batches of 10
    assert sc.rest.tolist() == list(range(30, 103)) and sc.label.startswith("the first 30 of 103 eval rows")
    first, rest = {"y": ds.inputs["x"][sc.first] * 2}, {"y": ds.inputs["x"][sc.rest] * 2}
    np.testing.assert_array_equal(sc.merge(first, rest)["y"], ds.inputs["x"] * 2)
    assert sc.targets.tolist() == list(range(30))
    assert build_screen(ds, 100, None, 0.25) is None  # its one whole batch would be 100 of the 103 rows
    assert build_screen(ds, 10, None, 0.0) is None
    ranking = Dataset({"x": np.zeros((50, 1))}, {"q1": [1, 2]}, False)
    assert build_screen(ranking, 10, None, 0.25) is None  # targets it cannot cut: every trial runs fully


@pytest.mark.parametrize("pairs", ["halves", "interleaved"])
def test_a_pair_scored_screen_keeps_only_pairs_whose_two_rows_ran(pairs):
    rng = np.random.default_rng(0)
    emb, gold = rng.normal(size=(80, 4)), rng.uniform(0, 5, 40)
    ds = Dataset({"e": emb}, gold, False)
    sc = build_screen(ds, 8, pairs, 0.25)
    assert sc is not None and len(sc.first) < 80
    ran = set(sc.first.tolist())
    a, b = (np.arange(40), np.arange(40) + 40) if pairs == "halves" else (2 * np.arange(40), 2 * np.arange(40) + 1)
    keep = [i for i in range(40) if a[i] in ran and b[i] in ran]
    got, got_gold = pair_scores(sc.outputs_for_metric({"e": emb[sc.first]})["e"], sc.targets, pairs)
    want, _ = pair_scores(emb, gold, pairs)
    np.testing.assert_allclose(got, want[keep]) and np.testing.assert_allclose(got_gold, gold[keep])


def test_a_screened_trial_that_goes_on_reports_exactly_the_unscreened_numbers(screened, tmp_path):
    assert screened.screen is not None and len(screened.screen.first) < len(screened.eval_set)
    plan = QuantPlan.uniform("int8", int8_activations="dynamic")  # per-batch scales: batching must be the same
    a = screened.evaluate(plan, tmp_path / "a", energy=False, screen=True)
    b = screened.evaluate(plan, tmp_path / "b", energy=False, screen=False)
    assert a.measurement.accuracy == b.measurement.accuracy


def test_a_plan_the_screen_rules_out_is_pruned_with_its_reason(tmp_path):
    from tests.pipeline.sensitivity.conftest import FRAGILE_FACTORY

    ev = Evaluator(_config("digits_mlp.yaml", tmp_path / "w", **SCREENED, **{"model.factory": FRAGILE_FACTORY}))
    plan = QuantPlan.uniform("int4", int4_block_size=64)  # this MLP's fc1 cannot take int4 (-0.2 accuracy alone)
    full = ev.evaluate(plan, tmp_path / "full", energy=False)
    budget = ev.config.search.max_accuracy_drop
    assert full.measurement.accuracy_drop > 2 * budget  # what the screen sees on its quarter, the full pass confirms
    with pytest.raises(TrialPruned, match=r"pruned early: accuracy drop .* on the first \d+ of 360 eval rows"):
        ev.evaluate(plan, tmp_path / "s", energy=False, screen=True)
    # through the worker: a PRUNED outcome with the reason, not a failure
    task = TrialTask(study="s", number=3, config=ev.config.model_dump(mode="json"), base_dir=str(ROOT),
                     cwd=os.getcwd(), plan_yaml=plan.to_yaml(), out_dir=str(tmp_path / "t"), energy=False,
                     screen=True)
    out = run_trial(task)
    assert out["status"] == "pruned" and out["reason"].startswith("pruned early:") and out["result"] is None
