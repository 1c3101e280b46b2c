from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, DataSpec, parse_config
from pipeline.data import SINGLE_INPUT_NAME, load_dataset

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
    with pytest.raises(ConfigError, match=r"data.eval.source: .* must return \(inputs, targets\)"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_returns_one"), CFG, "data.eval")
    with pytest.raises(ConfigError, match="different numbers of rows"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_ragged"), CFG, "data.eval")
    with pytest.raises(ConfigError, match="10 input rows but 3 targets"):
        load_dataset(DataSpec(source="tests.pipeline.test_data:_misaligned"), CFG, "data.eval")


def _returns_one():
    return np.zeros((3, 2))


def _ragged():
    return {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, np.zeros(3)


def _misaligned():
    return np.zeros((10, 2)), np.zeros(3)
