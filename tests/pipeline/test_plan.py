from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.formats import Format, Int8Activations
from pipeline.plan import QuantPlan

LAYERS = ["embed", "enc.0.q", "enc.0.ffn", "enc.1.q", "enc.1.ffn", "head"]


def test_first_matching_glob_wins_and_star_is_the_rest():
    plan = QuantPlan(layers={"enc.*.q": "int4", "enc.0.*": "fp8", "*": "int8"})
    r = plan.resolve(LAYERS)
    assert r["enc.0.q"].format is Format.INT4  # first pattern wins over enc.0.*
    assert r["enc.0.ffn"].format is Format.FP8
    assert r["enc.1.ffn"].format is Format.INT8 and r["embed"].format is Format.INT8


def test_unmatched_layers_default_to_fp32_and_unused_pattern_is_an_error():
    assert QuantPlan(layers={"head": "int8"}).resolve(LAYERS)["embed"].format is Format.FP32
    with pytest.raises(ValueError, match="match no quantizable layer"):
        QuantPlan(layers={"hed": "int8"}).resolve(LAYERS)


def test_long_form_overrides_knobs_per_layer():
    plan = QuantPlan(
        int8_activations="dynamic",
        int4_block_size=64,
        layers={"head": {"format": "int8", "int8_activations": "static"}, "enc.*": {"format": "int4", "int4_block_size": 128}, "*": "int8"},
    )
    r = plan.resolve(LAYERS)
    assert r["head"].int8_activations is Int8Activations.STATIC
    assert r["embed"].int8_activations is Int8Activations.DYNAMIC
    assert r["enc.0.q"].int4_block_size == 128 and r["embed"].int4_block_size == 64


def test_yaml_round_trip_and_errors(tmp_path):
    plan = QuantPlan(method="qat", calibration="percentile", layers={"fc1": "int4", "*": "int8"})
    p = tmp_path / "plan.yaml"
    p.write_text(plan.to_yaml())
    back = QuantPlan.from_yaml(p)
    assert back == plan and back.qat is not None  # qat budget gets defaults
    p.write_text("layers: {fc1: int3}\n")
    with pytest.raises(ConfigError, match="layers.fc1"):
        QuantPlan.from_yaml(p)
    p.write_text("layers: {fc1: int4}\nint4_block_size: 48\n")
    with pytest.raises(ConfigError, match="int4_block_size"):
        QuantPlan.from_yaml(p)


def test_summary_names_every_layer():
    s = QuantPlan(int8_activations="dynamic", layers={"head": "int4", "*": "int8"}).summary(LAYERS)
    assert s.split() == [f"{n}=int8(dyn)" for n in LAYERS[:-1]] + ["head=int4(b32)"]


def test_a_pattern_shadowed_by_an_earlier_one_is_an_error_not_ignored():
    """First match wins; a dict dumped with sorted keys puts "*" first and would silently turn every
    other line into a no-op: refused, naming the pattern and the one that takes its layers."""
    import pytest

    from pipeline.plan import QuantPlan

    names = ["fc1", "fc2", "head"]
    with pytest.raises(ValueError, match=r"'fc1' \(taken by '\*'\)"):
        QuantPlan(layers={"*": "int8", "fc1": "int4"}).resolve(names)
    with pytest.raises(ValueError, match=r"'fc2' \(taken by 'fc\*'\)"):
        QuantPlan(layers={"fc*": "int8", "fc2": "int4", "*": "fp32"}).resolve(names)
    ok = QuantPlan(layers={"fc1": "int4", "fc*": "int8", "*": "fp32"}).resolve(names)
    assert {n: c.format.value for n, c in ok.items()} == {"fc1": "int4", "fc2": "int8", "head": "fp32"}


def test_brief_counts_formats_on_a_deep_model_and_names_what_else_decides():
    names = [f"encoder.layer.{i}.{p}" for i in range(6) for p in ("q", "k", "v", "o", "up", "down")]
    plan = QuantPlan(layers={"encoder.layer.0.*": "fp32", "*.up": {"format": "int8", "int8_activations": "dynamic"},
                             "*": "int4"}, calibration="percentile")
    brief = plan.resolve(names).brief()
    assert "int4(b32)x25" in brief and "int8(dyn)x5" in brief and "fp32x6" in brief
    assert "[ptq]" in brief  # nothing calibrated: the calibration method does not matter, so it is not shown
    static = QuantPlan(layers={"*": "int8"}, calibration="entropy").resolve(names).brief()
    assert "int8x36" in static and "calibration entropy" in static and len(static) < 80
    few = QuantPlan(layers={"*": "int4"}).resolve(["fc1", "fc2"]).brief()
    assert few.startswith("fc1=int4(b32) fc2=int4(b32)")


@pytest.fixture(scope="module")
def encoder_layers(tmp_path_factory):
    """The tiny encoder's real layer table (exported from the model, not typed in)."""
    from pipeline.models import get_adapter
    from tests.conftest import _config

    cfg = _config("tiny_encoder.yaml", tmp_path_factory.mktemp("enc"))
    return get_adapter(cfg).export_reference(cfg.work_path).layer_table.names


def test_brief_says_what_differs_from_the_nearest_uniform_baseline(encoder_layers):
    import fnmatch

    from pipeline.plan import layer_patterns

    names = encoder_layers
    block = next(n.rsplit(".", 1)[0] for n in names if n.count(".") >= 2)  # a sub-module holding several layers
    inside = [n for n in names if n.startswith(block + ".")]
    assert len(inside) >= 2, names
    last = names[-1]
    plan = QuantPlan(layers={f"{block}.*": "fp32", last: "fp32", "*": "int8"})
    brief = plan.resolve(names).brief()
    base, _, rest = brief.partition(" · ")
    assert f"int8x{len(names) - len(inside) - 1}" in base and f"fp32x{len(inside) + 1}" in base
    assert rest.startswith(f"uniform int8 except {len(inside) + 1} fp32 ({block}.*, {last})"), brief
    assert rest.endswith("[ptq, calibration minmax]"), brief
    assert brief == plan.resolve(names).brief()  # deterministic
    # the listed patterns are the plan's own globs: they match exactly the layers that differ
    pats = layer_patterns(inside + [last], names)
    assert sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)) == sorted(inside + [last])
    uniform = QuantPlan.uniform("int8").resolve(names).brief()
    assert "uniform int8 [" in uniform and "except" not in uniform


def test_brief_caps_the_listed_names_and_counts_the_rest():
    names = [f"enc.blk.{b}.r{r}" for b in range(2) for r in range(5)] + ["head"]
    # every other layer: neither a block prefix nor a role (the same layer in every block) covers only these
    scattered = names[:10:2]
    plan = QuantPlan(layers={**{n: "int4" for n in scattered}, "*": "int8"})
    diff = plan.resolve(names).baseline_diff(max_names=3)
    listed = diff.split("int4(b32) (", 1)[1].removesuffix(")").split(", ")
    assert diff.startswith("uniform int8 except 5 int4(b32) ")  # the format most layers have
    assert listed[:3] == scattered[:3]
    assert len(listed) == 4 and listed[-1] == "+2 more", diff
    assert len(diff) < 200


def test_brief_names_a_role_changed_in_every_block_with_one_pattern(encoder_layers):
    import fnmatch
    import re

    from pipeline.plan import role_pattern

    names = encoder_layers
    role = next(role_pattern(n) for n in names if re.search(r"\.\d+\.", n))
    members = [n for n in names if fnmatch.fnmatchcase(n, role)]
    assert len(members) >= 2, names
    plan = QuantPlan(layers={role: "fp32", "*": "int8"})
    assert plan.resolve(names).baseline_diff() == f"uniform int8 except {len(members)} fp32 ({role})"
