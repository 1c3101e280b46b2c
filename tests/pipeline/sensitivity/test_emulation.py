"""Which formats a backend only emulates, per layer; the (format, op) -> form rule is checked
against what the real quantizer records for a CNN (Conv + Gemm layers)."""

from __future__ import annotations

import pytest

from pipeline.backends import resolve_backend
from pipeline.formats import Format, Int8Activations, QuantTarget
from pipeline.plan import LayerChoice
from pipeline.sensitivity import emulated_formats
from pipeline.sensitivity.emulation import realisations


@pytest.fixture(scope="module")
def cnn_evaluator(cnn_config):
    from pipeline.sensitivity.measure import evaluator_class, subset_config

    return evaluator_class()(subset_config(cnn_config, 64))


@pytest.mark.parametrize("fmt, act", [(Format.BF16, "static"), (Format.FP8, "static"), (Format.INT8, "static"),
                                      (Format.INT8, "dynamic"), (Format.INT4, "static")])
def test_realisation_rule_matches_the_quantizer(cnn_evaluator, tmp_path, fmt, act):
    from exporters.onnx_quant import quantize_model

    ev = cnn_evaluator
    table = ev.reference.layer_table
    choices = {n: LayerChoice(format=fmt, int8_activations=act) for n in table.names}
    q = quantize_model(ev.reference.onnx_path, table, choices, ev.calibration_feeds(), "minmax",
                       tmp_path / "q.onnx", workdir=tmp_path, target=QuantTarget.ORT)
    for lq in q.layers:
        assert [lq.realisation] == realisations(fmt, table[lq.name].onnx_op, QuantTarget.ORT, [Int8Activations(act)])


def test_ort_cpu_emulates_bf16_fp8_and_int4_conv(cnn_evaluator):
    backend, _ = resolve_backend("ort-cpu")
    table = cnn_evaluator.reference.layer_table
    em = emulated_formats(backend, table, list(Format))
    for layer in table:
        assert {Format.BF16, Format.FP8} <= em[layer.name]
        assert Format.INT8 not in em[layer.name] and Format.FP32 not in em[layer.name]
        assert (Format.INT4 in em[layer.name]) == (layer.onnx_op == "Conv")  # MatMulNBits is a real kernel


def test_embedding_fp8_is_native_on_ort_cpu():
    """GatherBlockQuantized reads fp8 tables natively: fp8 is left out per layer, not per format."""
    from pipeline.backends.native import execution

    (form,) = realisations(Format.FP8, "Gather", QuantTarget.ORT)
    assert execution("ort-cpu", Format.FP8, form) == "native"
    (trt_form,) = realisations(Format.INT4, "MatMul", QuantTarget.TENSORRT)
    assert execution("tensorrt", Format.INT4, trt_form) == "native"
