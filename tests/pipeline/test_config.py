"""Config validation: bad configs fail before any work, naming the field and the fix."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, parse_config

GOOD = {
    "name": "t",
    "model": {"factory": "pipeline.examples.digits:mlp"},
    "data": {
        "calibration": {"source": "pipeline.examples.digits:mlp_calibration"},
        "eval": {"source": "pipeline.examples.digits:mlp_eval"},
    },
}


def _with(**patch):
    import copy

    d = copy.deepcopy(GOOD)
    for dotted, value in patch.items():
        node = d
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return d


def test_good_config_loads_with_defaults():
    cfg = parse_config(GOOD)
    assert cfg.metric.name == "accuracy" and cfg.metric.higher_is_better is True
    assert cfg.measure.backend == "auto"
    assert [f.value for f in cfg.search.formats] == ["fp32", "bf16", "fp8", "int8", "int4"]
    assert cfg.search.objectives == ["accuracy", "energy", "size"]


@pytest.mark.parametrize(
    "patch, field, hint",
    [
        ({"measure__batch_size": 0}, "measure.batch_size", "greater than or equal to 1"),
        ({"measure__backend": "cuda"}, "measure.backend", "ort-cpu"),
        ({"search__formats": ["int3"]}, "search.formats.0", "fp32"),
        ({"search__int4_block_sizes": [48]}, "search.int4_block_sizes", "[32, 64, 128]"),
        ({"search__objectives": ["energy"]}, "search.objectives", "accuracy"),
        ({"metric__name": "mylib.scores:ndcg"}, "metric", "higher_is_better"),
        ({"metric__name": "bleu"}, "metric", "top_k_accuracy"),
        ({"metric": {"name": "accuracy", "pairs": "halves"}}, "metric.pairs", "spearman"),
        ({"metric": {"name": "accuracy", "k": 3}}, "metric.k", "top_k_accuracy"),
        ({"metric": {"name": "mse", "higher_is_better": True}}, "metric.higher_is_better", "lower-is-better"),
        ({"metric": {"name": "spearman", "pairs": "rows"}}, "metric.pairs", "halves"),
        ({"measure__eval_batch_size": 0}, "measure.eval_batch_size", "greater than or equal to 1"),
        ({"data__targets": {"source": "pipeline.examples.digits:nope"}}, "data.targets.source", "no attribute"),
        ({"modle": {}}, "modle", "unknown field - did you mean model? (valid here: data, export, loss, measure,"),
        ({"measure": {"warmpu": 3}}, "measure.warmpu", "did you mean warmup? (valid here: backend, batch_size,"),
        ({"name": "has space"}, "name", "letters"),
    ],
)
def test_bad_field_is_named_with_the_fix(patch, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(_with(**patch))
    msg = str(err.value)
    assert field in msg and hint in msg, msg


def test_missing_data_section_is_named():
    d = _with()
    del d["data"]["eval"]
    with pytest.raises(ConfigError, match=r"data\.eval: required field is missing"):
        parse_config(d)


def test_unimportable_factory_is_caught_at_load():
    with pytest.raises(ConfigError, match=r"model\.factory: cannot import module 'no_such_pkg.models'"):
        parse_config(_with(model={"factory": "no_such_pkg.models:net"}))
    with pytest.raises(ConfigError, match=r"data\.eval\.source: module 'pipeline.examples.digits' has no attribute"):
        parse_config(_with(data__eval={"source": "pipeline.examples.digits:nope"}))
    with pytest.raises(ConfigError, match=r"expected `package.module:function`"):
        parse_config(_with(data__calibration={"source": "digits"}))


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="factory"):
        parse_config(_with(model={"framework": "torch"}))


def test_load_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_are_dotted_and_validated(tmp_path):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    cfg = load_config(p, overrides={"search.trials": 7, "measure.runs": 3})
    assert cfg.search.trials == 7 and cfg.measure.runs == 3
    with pytest.raises(ConfigError, match="search.trials"):
        load_config(p, overrides={"search.trials": 0})


def test_bundled_presets_are_valid():
    from pathlib import Path

    presets = sorted(Path(__file__).resolve().parents[2].joinpath("search_spaces").glob("*.yaml"))
    assert presets
    for p in presets:
        try:
            load_config(p)
        except ConfigError as exc:
            if "keras" in str(exc) and "pip install" in str(exc):
                continue  # a Keras preset without the [keras] extra: the error names the install command
            raise


def test_tensorrt_refuses_dynamic_int8_only_when_the_user_asked_for_it():
    with pytest.raises(ConfigError) as err:
        parse_config(_with(measure__backend="tensorrt", search__int8_activations=["static", "dynamic"]))
    assert "search.int8_activations" in str(err.value) and "[static]" in str(err.value)
    # left at its default, the list is narrowed by the search space instead (tests/search_spaces)
    cfg = parse_config(_with(measure__backend="tensorrt"))
    assert [a.value for a in cfg.search.int8_activations] == ["static", "dynamic"]


def test_eval_batch_defaults_to_the_deployment_batch():
    cfg = parse_config(_with(measure__batch_size=8))
    assert cfg.measure.eval_batch_size is None and cfg.measure.eval_batch == 8
    cfg = parse_config(_with(measure__batch_size=8, measure__eval_batch_size=64))
    assert cfg.measure.eval_batch == 64 and cfg.measure.batch_size == 8


def test_metric_options_and_split_data_load():
    cfg = parse_config(_with(metric={"name": "top_k_accuracy", "k": 3},
                             data__targets={"source": "pipeline.examples.digits:mlp_eval"}))
    assert cfg.metric.higher_is_better is True and cfg.metric.k == 3
    assert cfg.data.targets.source == "pipeline.examples.digits:mlp_eval"
    cfg = parse_config(_with(metric={"name": "spearman", "pairs": "halves", "output": "emb"}))
    assert cfg.metric.pairs == "halves"
    cfg = parse_config(_with(metric={"name": "pipeline.metrics:mae", "higher_is_better": False,
                                     "kwargs": {"scale": 2}}))
    assert cfg.metric.kwargs == {"scale": 2}
    with pytest.raises(ConfigError, match=r"metric.kwargs: only a custom"):
        parse_config(_with(metric={"name": "accuracy", "kwargs": {"x": 1}}))
    # a config dumped and parsed again (what Ray workers receive) is the same config
    again = parse_config(cfg.model_dump(exclude={"base_dir"}, mode="json"))
    assert again.metric == cfg.metric and again.measure == cfg.measure


def test_new_data_metric_measure_fields_leave_old_configs_dumps_unchanged():
    """Fields added for the split data contract are dumped only when used, so an older config dumps (and
    hashes: resuming a study checks study.config_hash) exactly as before; when used they travel."""
    dumped = parse_config(GOOD).model_dump(mode="json")
    assert "targets" not in dumped["data"] and "eval_batch_size" not in dumped["measure"]
    assert not {"k", "pairs", "kwargs"} & set(dumped["metric"])
    cfg = parse_config(_with(data__targets={"source": "pipeline.examples.digits:mlp_eval"},
                             measure__eval_batch_size=4, metric={"name": "top_k_accuracy", "k": 2}))
    dumped = cfg.model_dump(mode="json")
    assert dumped["data"]["targets"]["source"] and dumped["measure"]["eval_batch_size"] == 4
    assert dumped["metric"]["k"] == 2
    again = parse_config(dumped)  # and parses back to the same settings (what Ray workers receive)
    assert (again.data, again.metric, again.measure) == (cfg.data, cfg.metric, cfg.measure)


def test_backend_names_come_from_the_plugins():
    """measure.backend accepts exactly the registry's names (plus auto), and the error lists them."""
    from pipeline.backends.registry import backend_names

    for name in ("auto", *backend_names()):
        if name == "tflite":
            continue  # Keras models only (its plugin's check_config)
        assert parse_config(_with(measure__backend=name)).measure.backend == name
    with pytest.raises(ConfigError) as err:
        parse_config(_with(measure__backend="openvino"))
    assert all(n in str(err.value) for n in backend_names())


def test_tflite_plugin_refuses_torch_models_at_load():
    with pytest.raises(ConfigError, match="measure.backend: tflite converts Keras models only"):
        parse_config(_with(measure__backend="tflite"))
