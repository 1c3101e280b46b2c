from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import ConfigError, DataSpec, parse_config
from pipeline.data import SINGLE_INPUT_NAME, calibration_batches, load_dataset, load_eval_set

CFG = parse_config({
    "name": "t",
    "model": {"factory": "pipeline.examples.digits:mlp"},
    "data": {"calibration": {"source": "pipeline.examples.digits:mlp_calibration"},
             "eval": {"source": "pipeline.examples.digits:mlp_eval"}},
})


def test_single_array_gets_the_single_input_name_and_limit_applies():
    ds = load_dataset(DataSpec(source="pipeline.examples.digits:mlp_eval", limit=10), CFG, "data.eval")
    assert list(ds.inputs) == [SINGLE_INPUT_NAME] and len(ds) == 10 and ds.targets.shape == (10,)
    assert ds.inputs[SINGLE_INPUT_NAME].dtype == np.float32


def test_npz_with_several_inputs(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, input_ids=np.ones((7, 4), np.int64), attention_mask=np.ones((7, 4), np.int64), targets=np.arange(7))
    ds = load_dataset(DataSpec(source=str(path)), CFG, "data.eval")
    assert sorted(ds.inputs) == ["attention_mask", "input_ids"] and len(ds) == 7
    batches = list(ds.batches(3))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    assert ds.fixed_batch(10)["input_ids"].shape == (10, 4)  # tiled to the timing batch size


def test_bad_return_values_name_the_field():
    with pytest.raises(ConfigError, match=r"data.eval.source: .* returned a tuple of 3"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_returns_three"), CFG, "data.eval")
    with pytest.raises(ConfigError, match="different numbers of rows"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_ragged"), CFG, "data.eval")
    with pytest.raises(ConfigError, match="10 input rows but 3 targets.*data.targets"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_misaligned"), CFG, "data.eval")
    with pytest.raises(ConfigError, match=r"data.eval.source: returned 0 rows"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_empty"), CFG, "data.eval")
    with pytest.raises(ConfigError, match=r"data.eval.source: input 'text' holds <U5 values.*tokenize"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_strings"), CFG, "data.eval")
    with pytest.raises(ConfigError, match=r"data.eval.source: calling .*_raises.* failed: OSError: disk gone"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_raises"), CFG, "data.eval")


def _returns_three():
    return np.zeros((3, 2)), np.zeros(3), np.zeros(3)


def _ragged():
    return {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, np.zeros(3)


def _misaligned():
    return np.zeros((10, 2)), np.zeros(3)


def _empty():
    return {"x": np.zeros((0, 4), np.float32)}


def _strings():
    return {"text": np.array(["hello", "world"])}


def _raises():
    raise OSError("disk gone")


# -- the split contract: inputs alone (eval_x / calib_x), targets apart (eval_y) -------------------

def eval_x(n: int = 12):
    return {"a": np.arange(2 * n, dtype=np.float32).reshape(n, 2), "b": np.ones((n, 3), np.int64)}


def eval_y(n: int = 12):
    return {"pairs": np.array([[0, 1], [2, 3]]), "scores": [1.0, 2.0], "n": n}


def calib_x():
    return np.random.default_rng(0).normal(size=(70, 64))  # float64: cast to float32 on load


def _cfg(**data):
    base = {"calibration": {"source": "tests.pipeline.test_data:calib_x"},
            "eval": {"source": "tests.pipeline.test_data:eval_x"}}
    base.update(data)
    return parse_config({"name": "t", "model": {"factory": "pipeline.examples.digits:mlp"}, "data": base})


def test_inputs_alone_are_accepted_and_targets_come_whole_from_data_targets():
    cfg = _cfg(targets={"source": "tests.pipeline.test_data:eval_y", "kwargs": {"n": 12}})
    ds = load_eval_set(cfg)
    assert sorted(ds.inputs) == ["a", "b"] and len(ds) == 12
    assert ds.targets["n"] == 12 and ds.row_targets is False
    assert ds.head(5).targets is ds.targets  # structured targets are never cut with the rows
    cal = load_dataset(cfg.data.calibration, cfg, "data.calibration")
    assert cal.targets is None and cal.inputs[SINGLE_INPUT_NAME].dtype == np.float32
    batches = calibration_batches(cal)
    assert [len(b[SINGLE_INPUT_NAME]) for b in batches] == [32, 32]  # equal batches, short one dropped
    # A changed target changes the fingerprint (the cached reference score is keyed by it).
    other = load_eval_set(_cfg(targets={"source": "tests.pipeline.test_data:eval_y", "kwargs": {"n": 13}}))
    assert other.fingerprint() != ds.fingerprint()


def test_targets_from_files_and_lists(tmp_path):
    np.save(tmp_path / "y.npy", np.arange(12))
    (tmp_path / "y.json").write_text(json.dumps({"q1": [1, 2], "q2": [5]}))
    ds = load_eval_set(_cfg(targets={"source": str(tmp_path / "y.npy")}))
    assert ds.targets.tolist() == list(range(12))
    ds = load_eval_set(_cfg(targets={"source": str(tmp_path / "y.json")}))
    assert ds.targets == {"q1": [1, 2], "q2": [5]}
    # a list of labels becomes an array, as the built-in metrics expect
    ds = load_eval_set(_cfg(targets={"source": "tests.pipeline.test_data:_label_list"}))
    assert isinstance(ds.targets, np.ndarray) and ds.targets.shape == (12,)


def _ranking():
    return {"q1": [1, 2], "q2": [5]}


def _label_list():
    return [0, 1] * 6


def test_eval_set_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"data.targets: the metric needs targets; give `data.targets"):
        load_eval_set(_cfg())
    with pytest.raises(ConfigError, match=r"data.targets: data.eval.source already returns \(inputs, targets\)"):
        load_eval_set(_cfg(eval={"source": "pipeline.examples.digits:mlp_eval"},
                           targets={"source": "tests.pipeline.test_data:eval_y"}))
    with pytest.raises(ConfigError, match=r"data.eval.limit: the targets are not one per input row"):
        load_eval_set(_cfg(eval={"source": "tests.pipeline.test_data:eval_x", "limit": 4},
                           targets={"source": "tests.pipeline.test_data:_ranking"}))
    with pytest.raises(ConfigError, match=r"data.targets.source: .* returned None"):
        load_eval_set(_cfg(targets={"source": "tests.pipeline.test_data:_none"}))
    with pytest.raises(ConfigError, match=r"data.targets.source: file .* does not exist"):
        load_eval_set(_cfg(targets={"source": "nowhere/y.npy"}))
    # targets with one entry per input row are cut with the rows by data.eval.limit
    ds = load_eval_set(_cfg(eval={"source": "tests.pipeline.test_data:eval_x", "limit": 4},
                            targets={"source": "tests.pipeline.test_data:_label_list"}))
    assert len(ds) == 4 and ds.targets.tolist() == [0, 1, 0, 1] and ds.row_targets


def _none():
    return None


def test_calibration_batches_name_a_missing_model_input():
    cfg = _cfg()
    cal = load_dataset(cfg.data.calibration, cfg, "data.calibration")
    with pytest.raises(ConfigError, match=r"data.calibration.source: the model needs input\(s\) \['pixels'\]"):
        calibration_batches(cal, ["pixels"])


def digits_x():
    from pipeline.examples.digits import mlp_train

    return mlp_train()[0]  # inputs only: QAT learns from the FP32 model's own outputs


def test_qat_trains_on_a_split_form_config_by_self_distillation(mlp_config, tmp_path):
    """QAT needs a target per training row; with inputs-only `data.train` it distils the FP32 model."""
    from pipeline.models import get_adapter
    from pipeline.plan import QATSettings, QuantPlan
    from pipeline.qat import run_qat

    data = mlp_config.data.model_copy(update={
        "train": DataSpec(source="tests.pipeline.test_data:digits_x"),
        "calibration": DataSpec(source="tests.pipeline.test_data:digits_x", limit=64),
    })
    cfg = mlp_config.model_copy(update={"data": data})
    adapter = get_adapter(cfg)
    ref = adapter.export_reference(mlp_config.work_path)
    plan = QuantPlan(method="qat", layers={"*": "int8"}, qat=QATSettings(steps=10, batch_size=32, seed=0))
    out = run_qat(cfg, adapter, plan, ref, tmp_path)
    assert out.steps == 10 and len(out.loss_curve) == 10 and all(np.isfinite(out.loss_curve))
    assert out.loss == "cross_entropy"  # the config's loss, on the FP32 teacher's logits (soft targets)


def _pair_rows(n: int = 10):
    rng = np.random.default_rng(3)
    return {"emb": rng.normal(size=(2 * n, 4)).astype(np.float32)}


def _pair_gold(n: int = 10):
    return np.random.default_rng(4).uniform(0, 5, n)


def _pair_dict(n: int = 10):
    # pairs name their rows: pair i = (rows 2n-1-i, i), so a cut must gather and renumber rows
    return {"pairs": np.array([[2 * n - 1 - i, i] for i in range(n)]), "scores": _pair_gold(n)}


@pytest.mark.parametrize("pairs", ["halves", "interleaved"])
def test_limit_cuts_pair_scored_sets_by_pairs_and_the_metric_sees_the_first_pairs(pairs):
    from pipeline.metrics import pair_scores

    data = {"eval": {"source": "tests.pipeline.test_data:_pair_rows", "limit": 7},
            "targets": {"source": "tests.pipeline.test_data:_pair_gold"}}
    cfg = parse_config({"name": "t", "model": {"factory": "pipeline.examples.digits:mlp"},
                        "metric": {"name": "spearman", "pairs": pairs},
                        "data": {"calibration": {"source": "tests.pipeline.test_data:calib_x"}, **data}})
    ds = load_eval_set(cfg)
    assert len(ds) == 6 and ds.targets.tolist() == _pair_gold()[:3].tolist()  # 7 rows -> 3 whole pairs
    full = _pair_rows()["emb"]
    pred, gold = pair_scores(ds.inputs["emb"], ds.targets, pairs)
    want, _ = pair_scores(full, _pair_gold(), pairs)
    np.testing.assert_allclose(pred, want[:3], rtol=1e-6)  # the same three pairs, paired the same way


def test_limit_cuts_explicit_pair_targets_and_renumbers_their_rows():
    from pipeline.metrics import pair_scores

    cfg = _cfg(eval={"source": "tests.pipeline.test_data:_pair_rows", "limit": 5},
               targets={"source": "tests.pipeline.test_data:_pair_dict"})
    ds = load_eval_set(cfg)
    assert len(ds) == 4 and len(ds.targets["pairs"]) == 2  # a third pair would make 6 rows
    assert ds.targets["pairs"].max() < len(ds)
    pred, _ = pair_scores(ds.inputs["emb"], ds.targets, None)
    want, _ = pair_scores(_pair_rows()["emb"], _pair_dict(), None)
    np.testing.assert_allclose(pred, want[:2], rtol=1e-6)
