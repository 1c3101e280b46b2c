"""search_spaces.space: a config's search section as Optuna parameters, with a real (in-memory) Optuna study."""

from __future__ import annotations

import optuna
import pytest

from pipeline.config import ConfigError, SearchSpec
from pipeline.formats import Format
from search_spaces.space import LAYER_PREFIX, P_CALIBRATION, P_INT4_BLOCK, P_INT8_ACT, P_METHOD, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

LAYERS = ["embed", "encoder.0.q", "encoder.0.k", "encoder.1.q", "encoder.1.k", "head"]


def _sample(space: SearchSpace, n: int, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        plan = space.suggest(trial)
        out.append((trial, plan))
        study.tell(trial, 0.0)
    return out


def test_default_space_covers_every_layer_with_allowed_formats():
    space = SearchSpace.build(SearchSpec(), LAYERS)
    assert space.searched == tuple(LAYERS)
    seen = set()
    for trial, plan in _sample(space, 40):
        resolved = plan.resolve(LAYERS)
        assert set(resolved) == set(LAYERS)
        for name, choice in resolved.items():
            assert trial.params[LAYER_PREFIX + name] == choice.format.value
            seen.add(choice.format)
        assert plan.method == "ptq"
    assert seen == set(Format)  # 240 random draws reach all five formats


def test_pins_and_excludes_are_fixed_not_searched():
    spec = SearchSpec(formats=["int8", "int4"], pin={"head": "fp32", "encoder.1.*": "bf16"}, exclude=["embed"])
    space = SearchSpace.build(spec, LAYERS)
    assert space.searched == ("encoder.0.q", "encoder.0.k")
    assert space.excluded == ("embed",)
    assert space.pinned == {"head": Format.FP32, "encoder.1.q": Format.BF16, "encoder.1.k": Format.BF16}
    for trial, plan in _sample(space, 15):
        resolved = plan.resolve(LAYERS)
        assert resolved["embed"].format is Format.FP32
        assert resolved["head"].format is Format.FP32
        assert resolved["encoder.1.q"].format is Format.BF16
        assert {resolved["encoder.0.q"].format, resolved["encoder.0.k"].format} <= {Format.INT8, Format.INT4}
        assert {k for k in trial.params if k.startswith(LAYER_PREFIX)} == {LAYER_PREFIX + "encoder.0.q",
                                                                           LAYER_PREFIX + "encoder.0.k"}


def test_knobs_exist_only_when_a_format_uses_them():
    space = SearchSpace.build(SearchSpec(methods=["ptq", "qat"]), LAYERS)
    for trial, plan in _sample(space, 60, seed=1):
        fmts = {c.format for c in plan.resolve(LAYERS).values()}
        assert (P_INT8_ACT in trial.params) == (Format.INT8 in fmts)
        assert (P_INT4_BLOCK in trial.params) == (Format.INT4 in fmts)
        static_int8 = Format.INT8 in fmts and trial.params.get(P_INT8_ACT) == "static"
        assert (P_CALIBRATION in trial.params) == (Format.FP8 in fmts or static_int8)
        assert trial.params[P_METHOD] == plan.method
        assert (plan.qat is not None) == (plan.method == "qat")
        if plan.method == "qat":
            assert plan.qat.steps in (100, 300)
            assert 1e-5 <= plan.qat.learning_rate <= 1e-3


def test_params_rebuild_exactly_the_sampled_plan():
    space = SearchSpace.build(SearchSpec(methods=["ptq", "qat"], pin={"head": "int8"}), LAYERS)
    for trial, plan in _sample(space, 30, seed=2):
        assert space.plan_from_params(trial.params) == plan


def test_uniform_baselines_enqueue_to_uniform_plans():
    spec = SearchSpec(pin={"head": "fp32"})
    space = SearchSpace.build(spec, LAYERS)
    baselines = space.uniform_baselines()
    assert list(baselines) == ["uniform-fp32", "uniform-bf16", "uniform-fp8", "uniform-int8", "uniform-int8-dynamic",
                               "uniform-int4"]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for label, params in baselines.items():
        study.enqueue_trial(params, user_attrs={"baseline": label})
    for label in baselines:
        trial = study.ask()
        assert trial.user_attrs["baseline"] == label
        plan = space.suggest(trial)
        fmt = Format(label.removeprefix("uniform-").removesuffix("-dynamic"))
        resolved = plan.resolve(LAYERS)
        assert resolved["head"].format is Format.FP32  # the pin holds in every baseline
        assert {c.format for n, c in resolved.items() if n != "head"} == {fmt}
        # deterministic knobs: the config's first choices
        assert plan.calibration.value == spec.calibrations[0].value
        assert plan.int8_activations.value == ("dynamic" if label.endswith("-dynamic") else spec.int8_activations[0].value)
        assert plan.int4_block_size == spec.int4_block_sizes[0]
        study.tell(trial, 0.0)


@pytest.mark.parametrize("modes, labels", [
    (["static"], ["uniform-int8"]),
    (["dynamic"], ["uniform-int8"]),
    (["static", "dynamic"], ["uniform-int8", "uniform-int8-dynamic"]),
    (["dynamic", "static"], ["uniform-int8", "uniform-int8-static"]),
])
def test_one_int8_baseline_per_allowed_activation_mode(modes, labels):
    space = SearchSpace.build(SearchSpec(formats=["fp32", "int8"], int8_activations=modes), LAYERS)
    baselines = space.uniform_baselines()
    assert list(baselines) == ["uniform-fp32", *labels]
    got = [space.plan_from_params(baselines[label]).int8_activations.value for label in labels]
    assert got == modes  # each mode once, the first one under the plain label


def test_baselines_follow_narrowed_formats():
    space = SearchSpace.build(SearchSpec(formats=["int8", "fp32"]), LAYERS)
    assert list(space.uniform_baselines()) == ["uniform-fp32", "uniform-int8", "uniform-int8-dynamic"]
    with pytest.raises(ValueError, match="not in search.formats"):
        space.params_for({n: Format.INT4 for n in space.searched})


def test_glob_characters_in_layer_names_stay_literal():
    names = ["blocks[0].fc", "blocks[1].fc", "out*"]
    space = SearchSpace.build(SearchSpec(formats=["int8", "fp32"]), names)
    for _, plan in _sample(space, 5):
        assert set(plan.resolve(names)) == set(names)


@pytest.mark.parametrize("spec, match", [
    (dict(pin={"decoder.*": "int8"}), r"search\.pin: pattern\(s\) \['decoder\.\*'\] match no quantizable layer"),
    (dict(exclude=["nope"]), r"search\.exclude: pattern\(s\) \['nope'\]"),
    (dict(pin={"head": "int8"}, exclude=["h*"]), "both pinned"),
    (dict(exclude=["*"]), "nothing is left to search"),
])
def test_bad_pins_and_excludes_name_the_field(spec, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace.build(SearchSpec(**spec), LAYERS)


def test_params_from_another_space_are_refused():
    space = SearchSpace.build(SearchSpec(), LAYERS)
    with pytest.raises(KeyError, match="missing"):
        space.plan_from_params({LAYER_PREFIX + "embed": "fp32"})
    params = space.uniform_baselines()["uniform-fp32"]
    params[LAYER_PREFIX + "head"] = "int2"
    with pytest.raises(ValueError, match="not one of"):
        space.plan_from_params(params)


def test_tensorrt_target_never_samples_dynamic_int8():
    from pipeline.formats import Int8Activations, QuantTarget

    ort_space = SearchSpace.build(SearchSpec(formats=["int8"]), LAYERS)
    trt_space = SearchSpace.build(SearchSpec(formats=["int8"]), LAYERS, target=QuantTarget.TENSORRT)
    assert {p.int8_activations for _, p in _sample(ort_space, 30)} == set(Int8Activations)  # both reachable
    sampled = _sample(trt_space, 30)
    assert {p.int8_activations for _, p in sampled} == {Int8Activations.STATIC}
    assert all(P_INT8_ACT not in t.params for t, _ in sampled)  # no knob left to search
    assert "int8_activations ['dynamic']" in trt_space.describe()
    assert trt_space.params_for({n: Format.INT8 for n in LAYERS}).get(P_INT8_ACT, "static") == "static"
    with pytest.raises(ConfigError, match=r"search.int8_activations: \['dynamic'\].*set \[static\]"):
        SearchSpace.build(SearchSpec(formats=["int8"], int8_activations=["dynamic"]), LAYERS, target="tensorrt")
    # no int8 layer possible: nothing to refuse
    SearchSpace.build(SearchSpec(formats=["fp32", "bf16"], int8_activations=["dynamic"]), LAYERS, target="tensorrt")
