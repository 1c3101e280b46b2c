"""A Keras 3 CNN on scikit-learn's 8x8 digits: the bundled Keras example.

``cnn()`` trains in a few seconds on first use and caches the trained, compiled
model as a ``.keras`` file (written atomically, so parallel Ray workers and tests
never read half a file); later calls load it. The cache folder is
``$PRECISION_SEARCH_CACHE`` or ``~/.cache/precision-search``.

Data functions return ``(inputs, targets)``, the contract of ``data.*.source``,
with images channels-last ``(N, 8, 8, 1)`` as Keras convolutions expect. The
split is the PyTorch example's (``pipeline.examples.digits``): a fixed, stratified
60/20/20 train/calibration/eval split, so calibration never sees eval rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.examples.digits import CACHE_DIR, _splits

INPUT_NAME = "input"  # the data's single-input name (pipeline.data.SINGLE_INPUT_NAME)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, 8, 8, 1), dtype=np.float32)


def train() -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["train"]
    return _nhwc(x), y


def calibration() -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["calibration"]
    return _nhwc(x), y


def evaluation() -> tuple[np.ndarray, np.ndarray]:
    x, y = _splits()["eval"]
    return _nhwc(x), y


def build_cnn(width: int = 16):
    """Uncompiled, untrained: 3 Conv2D + 2 Dense, same shape as the PyTorch digits CNN, narrower."""
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    L = keras.layers
    inp = keras.Input((8, 8, 1), name=INPUT_NAME)
    h = L.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.MaxPooling2D(2, name="pool")(h)
    h = L.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv3")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(64, activation="relu", name="fc1")(h)
    out = L.Dense(10, name="fc2")(h)
    return keras.Model(inp, out, name="digits_cnn")


def compile_for_training(model, learning_rate: float = 2e-3):
    """Adam + sparse categorical cross-entropy on logits; the loss QAT reuses."""
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _train(model, epochs: int, seed: int):
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    keras.utils.set_random_seed(seed)
    x, y = train()
    compile_for_training(model)
    model.fit(x, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    return model


def cnn(checkpoint: str | None = None, width: int = 16, epochs: int = 15, seed: int = 0):
    """The trained CNN (~97-98% on the eval split after a few seconds of CPU training).

    ``checkpoint`` is where the trained ``.keras`` file lives (created if missing);
    by default a per-width file in the cache folder.
    """
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    # v2: the initial weights are seeded too, so every machine trains the same model.
    path = Path(checkpoint) if checkpoint else CACHE_DIR / f"digits_keras_cnn_w{width}_e{epochs}_s{seed}_v2.keras"
    if path.exists():
        return keras.saving.load_model(str(path))
    keras.utils.set_random_seed(seed)
    model = _train(build_cnn(width), epochs, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(str(tmp))
    os.replace(tmp, path)  # atomic: parallel workers never read a half-written file
    return model
