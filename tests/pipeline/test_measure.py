"""The eval batch is a setting of its own, and it matters: dynamic INT8 scales activations per batch."""

from __future__ import annotations

import numpy as np


def test_dynamic_int8_outputs_depend_on_the_eval_batch_and_measurements_record_it(make_config, tmp_path):
    from pipeline.evaluate import Evaluator
    from pipeline.formats import Format, Int8Activations
    from pipeline.measure import run_dataset
    from pipeline.plan import QuantPlan

    plan = QuantPlan.uniform(Format.INT8, int8_activations=Int8Activations.DYNAMIC)
    ev = Evaluator(make_config("digits_mlp.yaml", **{"measure.eval_batch_size": 1}))
    result = ev.evaluate(plan, tmp_path / "int8-dyn", energy=False)
    m = result.measurement
    assert (m.batch_size, m.eval_batch_size) == (64, 1)  # timing at the deployment batch, scored one by one
    assert m.batch_note() == "timing batch 64, eval batch 1"

    session = ev.backend.open(result.artifact_path)
    one = next(iter(run_dataset(session, ev.eval_set, 1).values()))
    whole = next(iter(run_dataset(session, ev.eval_set, len(ev.eval_set)).values()))
    assert one.shape == whole.shape and not np.allclose(one, whole, atol=1e-6)  # per-batch activation ranges
    ref = ev.backend.open(ev.reference.onnx_path)  # FP32 does not care
    np.testing.assert_allclose(next(iter(run_dataset(ref, ev.eval_set, 1).values())),
                               next(iter(run_dataset(ref, ev.eval_set, 64).values())), atol=1e-5)
