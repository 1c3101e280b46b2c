"""A small BERT-style encoder with ``input_ids`` + ``attention_mask`` inputs.

It stands for the typical user model (token embeddings, 3-D activations,
integer inputs, several named inputs). Weights are random but seeded; the
task is a synthetic sentence-pair-free regression so that Spearman and MSE
metrics have something meaningful to rank: the target is the model's own FP32
score, so the FP32 reference has Spearman 1.0 and quantization can only lose.
"""

from __future__ import annotations

import numpy as np

VOCAB = 512
SEQ = 16


def encoder(vocab: int = VOCAB, dim: int = 64, heads: int = 4, layers: int = 2, seed: int = 0):
    import torch
    import torch.nn as nn

    class TinyEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(1, SEQ, dim))
            block = nn.TransformerEncoderLayer(dim, heads, dim * 2, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 1)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
            x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            m = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
            return self.head(pooled).squeeze(-1)

    torch.manual_seed(seed)
    model = TinyEncoder()
    # TransformerEncoder deep-copies one layer: re-initialise so layers differ, as trained ones do.
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=0.08)
    return model.eval()


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ), dtype=np.int64)
    lengths = rng.integers(4, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


def _labelled(n: int, seed: int):
    import torch

    inputs = _tokens(n, seed)
    with torch.no_grad():
        y = encoder()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    return inputs, y.astype(np.float32)


def calibration_data(n: int = 64):
    return _labelled(n, seed=1)


def eval_data(n: int = 128):
    return _labelled(n, seed=2)
