"""The format registry: every Format has a family, and the rules it answers are the old ones."""

import pickle

import pytest

from pipeline.formats import (
    Calibration,
    Format,
    Int8Activations,
    WEIGHT_BITS,
    by_name,
    families,
    needs_calibration,
    realisations,
    tag,
)
from pipeline.formats.registry import is_native, is_unsupported, qat_calibrated_kinds, qat_input_kind, qat_output_kind
from pipeline.plan import LayerChoice, QuantPlan, ResolvedPlan, resolved


def test_every_format_has_one_family_with_its_bits():
    assert set(families()) == set(Format)
    assert WEIGHT_BITS == {Format.FP32: 32, Format.BF16: 16, Format.FP8: 8, Format.INT8: 8, Format.INT4: 4}
    assert by_name("float32") is Format.FP32 and by_name("INT8") is Format.INT8
    with pytest.raises(ValueError, match="unknown format 'nvfp4'"):
        by_name("nvfp4")


@pytest.mark.parametrize(("fmt", "act", "calibrated"), [
    (Format.FP32, Int8Activations.STATIC, False), (Format.BF16, Int8Activations.STATIC, False),
    (Format.FP8, Int8Activations.DYNAMIC, True), (Format.INT8, Int8Activations.STATIC, True),
    (Format.INT8, Int8Activations.DYNAMIC, False), (Format.INT4, Int8Activations.STATIC, False),
])
def test_the_calibrated_rule(fmt, act, calibrated):
    assert needs_calibration(LayerChoice(format=fmt, int8_activations=act)) is calibrated


def test_tags_and_qat_kinds():
    assert tag(LayerChoice(format=Format.INT8, int8_activations=Int8Activations.DYNAMIC)) == "int8(dyn)"
    assert tag(LayerChoice(format=Format.INT4, int4_block_size=64)) == "int4(b64)"
    assert tag(LayerChoice(format=Format.BF16)) == "bf16"
    assert qat_calibrated_kinds() == {"int8_static", "fp8"}
    assert qat_input_kind(LayerChoice(format=Format.INT4)) is None
    assert qat_output_kind(LayerChoice(format=Format.INT8), "Conv") == "int8_static"
    assert qat_output_kind(LayerChoice(format=Format.INT8), "MatMul") is None


def test_native_rule_reads_the_declarations():
    assert set(realisations()) >= {"fp32", "qdq-int8", "dynamic-int8", "matmulnbits-int4", "cast-bf16", "qdq-fp8"}
    assert is_native("ort-cpu", Format.INT8, "qdq-int8")
    assert not is_native("ort-cuda", Format.INT8, "qdq-int8")
    assert not is_native("tensorrt", Format.FP8, "qdq-fp8") and is_native("tensorrt", Format.FP8, "qdq-fp8", True)
    assert is_native("my-npu", Format.INT8, "qdq-int8", extra={"qdq-int8"})  # a plugin's own additions
    assert is_unsupported("tensorrt", "qdq-fp8") and not is_unsupported("tensorrt", "qdq-fp8", True)
    assert is_unsupported("tensorrt", "dynamic-int8")


def test_resolved_plan_is_resolved_once_and_keys_like_the_study():
    plan = QuantPlan(calibration=Calibration.PERCENTILE, layers={"a": "int8", "b": "int4", "*": "bf16"})
    r = plan.resolve(["a", "b", "c"])
    assert isinstance(r, ResolvedPlan) and dict(r) == r.choices and list(r) == ["a", "b", "c"]
    assert r.summary() == plan.summary(["a", "b", "c"]) == "a=int8 b=int4(b32) c=bf16"
    assert r.tags() == {"a": "int8", "b": "int4(b32)", "c": "bf16"}
    assert r.calibrated
    assert resolved(r, ["a", "b", "c"]) is r  # passed through, not resolved again
    with pytest.raises(ValueError, match="other layers"):
        resolved(r, ["a", "b"])
    assert pickle.loads(pickle.dumps(r)).key() == r.key()
    # calibration only counts where something is calibrated
    dyn = QuantPlan(int8_activations="dynamic", layers={"*": "int8"})
    assert dyn.resolve(["a"]).key() == dyn.model_copy(update={"calibration": Calibration.ENTROPY}).resolve(["a"]).key()


def _stored_key(plan, names):
    """The plan key studies stored before ResolvedPlan existed (the old search code, frozen here): a resumed
    study finds its measured plans by this hash, so ResolvedPlan.key() must reproduce it bit for bit."""
    import hashlib
    import json

    layers, calibrated = {}, False
    for name, c in plan.resolve(names).items():
        entry = {"format": c.format.value}
        if c.format is Format.INT8:
            entry["int8_activations"] = c.int8_activations.value
            calibrated |= c.int8_activations.value == "static"
        if c.format is Format.INT4:
            entry["int4_block_size"] = int(c.int4_block_size)
        calibrated |= c.format is Format.FP8
        layers[name] = entry
    data = {"method": plan.method, "layers": layers, "calibration": plan.calibration.value if calibrated else None,
            "qat": plan.qat.model_dump(mode="json") if plan.qat is not None else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def test_resolved_plan_key_matches_the_key_studies_stored():
    from pipeline.search.plans import plan_key

    for plan in (QuantPlan(layers={"a": "int8", "*": "fp8"}), QuantPlan.uniform("int4", int4_block_size=128, method="qat"),
                 QuantPlan(layers={"a": "int8", "*": "int4"}, int8_activations="dynamic", calibration="percentile")):
        assert plan.resolve(["a", "b"]).key() == _stored_key(plan, ["a", "b"]) == plan_key(plan, ["a", "b"])


def test_embedding_lookups_are_never_calibrated():
    int8 = LayerChoice(format=Format.INT8)
    assert needs_calibration(int8) and needs_calibration(int8, "MatMul") and not needs_calibration(int8, "Gather")
