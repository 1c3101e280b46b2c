"""search_spaces: emulated formats left out by default, per-layer pruned formats, layer groups -
sampled through a real in-memory Optuna study."""

from __future__ import annotations

import optuna
import pytest

from pipeline.config import SearchSpec
from pipeline.formats import Format
from search_spaces.pruning import GROUP_PREFIX, group_key
from search_spaces.space import LAYER_PREFIX, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

LAYERS = ["embed", "encoder.0.q", "encoder.0.k", "encoder.1.q", "encoder.1.k", "head"]
# what ORT CPU emulates: bf16 everywhere, fp8 except the embedding (GatherBlockQuantized is native)
EMULATED = {n: {Format.BF16} | ({Format.FP8} if n != "embed" else set()) for n in LAYERS}


def _plans(space: SearchSpace, n: int, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, space.suggest(trial)))
        study.tell(trial, 0.0)
    return out


def test_emulated_formats_are_left_out_with_one_line_saying_how_to_include_them():
    space = SearchSpace.build(SearchSpec(), LAYERS, emulated=EMULATED)
    seen: dict[str, set[Format]] = {n: set() for n in LAYERS}
    for _, plan in _plans(space, 60):
        for n, c in plan.resolve(LAYERS).items():
            seen[n].add(c.format)
    assert all(Format.BF16 not in s for s in seen.values())
    assert all(Format.FP8 not in seen[n] for n in LAYERS if n != "embed")
    assert Format.FP8 in seen["embed"]
    notes = [p for p in space.describe().split("; ") if "emulates" in p]
    assert len(notes) == 1 and "search.include_emulated: true" in notes[0] and "bf16 (6 layers)" in notes[0]
    # the uniform baselines only hold formats every searched layer may take
    assert list(space.uniform_baselines()) == ["uniform-fp32", "uniform-int8", "uniform-int8-dynamic", "uniform-int4"]


def test_an_emulated_format_that_is_the_only_way_to_fewer_bits_stays():
    """INT4 on a Conv is stored int4 and computed in fp32 on ORT CPU: slower, but nothing native is as small,
    so a size objective may want it; bf16/fp8 beside native int8 buy nothing and are left out."""
    emulated = {"conv1": {Format.BF16, Format.FP8, Format.INT4}, "fc": {Format.BF16, Format.FP8}}
    space = SearchSpace.build(SearchSpec(), ["conv1", "fc"], emulated=emulated)
    seen = {n: set() for n in ("conv1", "fc")}
    for _, plan in _plans(space, 60):
        for n, c in plan.resolve(["conv1", "fc"]).items():
            seen[n].add(c.format)
    assert seen["conv1"] == {Format.FP32, Format.INT8, Format.INT4}
    assert seen["fc"] == {Format.FP32, Format.INT8, Format.INT4}
    # with no native format as small as int8 on a layer, an emulated 8-bit format is that layer's only 8-bit
    only = SearchSpace.build(SearchSpec(formats=["fp32", "fp8"]), ["fc"], emulated={"fc": {Format.FP8}})
    assert {c.format for _, p in _plans(only, 30) for c in p.resolve(["fc"]).values()} == {Format.FP32, Format.FP8}


def test_include_emulated_keeps_every_format():
    space = SearchSpace.build(SearchSpec(include_emulated=True), LAYERS, emulated=EMULATED)
    assert "emulates" not in space.describe()
    formats = {c.format for _, p in _plans(space, 60) for c in p.resolve(LAYERS).values()}
    assert formats == set(Format)


def test_sensitivity_pruned_formats_are_not_proposed_or_enqueued():
    allowed = {n: list(Format) for n in LAYERS}
    allowed["head"] = [Format.FP32, Format.INT8]
    space = SearchSpace.build(SearchSpec(formats=["fp32", "int8", "int4"]), LAYERS, allowed=allowed)
    for _, plan in _plans(space, 40, seed=3):
        assert plan.resolve(LAYERS)["head"].format in (Format.FP32, Format.INT8)
    assert "pruned by sensitivity" in space.describe() and "int4 on head" in space.describe()
    with pytest.raises(ValueError, match="head"):
        space.params_for({n: Format.INT4 for n in space.searched})
    params = space.params_for({**{n: Format.INT4 for n in space.searched}, "head": Format.INT8})
    assert space.plan_from_params(params).resolve(LAYERS)["head"].format is Format.INT8
    assert "uniform-int4" not in space.uniform_baselines()


@pytest.mark.parametrize("mode, expected", [
    ("block", {"embed": ["embed"], "encoder.0": ["encoder.0.q", "encoder.0.k"],
               "encoder.1": ["encoder.1.q", "encoder.1.k"], "head": ["head"]}),
    ("role", {"embed": ["embed"], "encoder.*.q": ["encoder.0.q", "encoder.1.q"],
              "encoder.*.k": ["encoder.0.k", "encoder.1.k"], "head": ["head"]}),
])
def test_groups_share_one_parameter(mode, expected):
    groups: dict[str, list[str]] = {}
    for n in LAYERS:
        groups.setdefault(group_key(n, mode), []).append(n)
    assert groups == expected
    space = SearchSpace.build(SearchSpec(group_layers=mode, formats=["fp32", "int8", "int4"]), LAYERS)
    for trial, plan in _plans(space, 20, seed=1):
        r = plan.resolve(LAYERS)
        for key, members in expected.items():
            assert len({r[m].format for m in members}) == 1
            param = LAYER_PREFIX + key if members == [key] else GROUP_PREFIX + key
            assert trial.params[param] == r[members[0]].format.value
        assert space.plan_from_params(trial.params) == plan
    assert f"6 layers searched as 4 {mode} group(s)" in space.describe()
    with pytest.raises(ValueError, match="share"):
        space.params_for({**{n: Format.INT8 for n in LAYERS}, "encoder.0.q": Format.INT4})


def test_a_group_takes_only_formats_all_its_layers_allow():
    allowed = {n: [Format.FP32, Format.INT8, Format.INT4] for n in LAYERS}
    allowed["encoder.1.k"] = [Format.FP32, Format.INT8]
    space = SearchSpace.build(SearchSpec(group_layers="block", formats=["fp32", "int8", "int4"]), LAYERS,
                              allowed=allowed)
    for _, plan in _plans(space, 30, seed=2):
        assert plan.resolve(LAYERS)["encoder.1.q"].format is not Format.INT4


def test_auto_grouping_searches_roles_only_for_many_repeated_layers():
    from search_spaces.pruning import AUTO_GROUP_MIN_LAYERS, group_mode

    spec = SearchSpec(formats=["fp32", "int8", "int4"])
    assert spec.group_layers == "auto"
    assert group_mode(spec, LAYERS) == "layer"  # 6 layers: each is its own choice
    blocks = AUTO_GROUP_MIN_LAYERS // 6 + 1
    encoder = ["embed"] + [f"enc.layer.{i}.{r}" for i in range(blocks) for r in ("q", "k", "v", "o", "ff1", "ff2")]
    assert len(encoder) > AUTO_GROUP_MIN_LAYERS and group_mode(spec, encoder) == "role"
    space = SearchSpace.build(spec, encoder)
    assert f"{len(encoder)} layers searched as 7 role group(s) (search.group_layers: auto" in space.describe()
    unrepeated = [f"conv{i}" for i in range(AUTO_GROUP_MIN_LAYERS + 5)]  # no block structure: nothing to share
    assert group_mode(spec, unrepeated) == "layer"
    assert group_mode(SearchSpec(group_layers="layer"), encoder) == "layer"  # an explicit choice stands
