"""TensorFlow and Keras, imported lazily with quiet logs and bounded thread pools.

Only the Keras adapter, Keras QAT and the TFLite path touch TensorFlow; they all import it
through :func:`import_tf` so its C++ log noise is silenced and its thread pools follow
``measure.threads``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

KERAS_EXTRA_HINT = "pip install -e '.[keras]'   (or: make venv EXTRAS=keras)"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 while TensorFlow's C++ runtime loads.

    TF 2.21 prints absl/oneDNN/CUDA-stub lines *before* absl logging is initialised,
    which ``TF_CPP_MIN_LOG_LEVEL`` cannot stop. Python exceptions still propagate
    (they are raised after the fd is restored). ``PRECISION_SEARCH_TF_VERBOSE=1``
    keeps everything.
    """
    if os.environ.get("PRECISION_SEARCH_TF_VERBOSE") == "1":
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_TF_THREADS: int | None = None
_GPUS_CONFIGURED = False


def import_tf(threads: int | None = None):
    """``(tensorflow, keras)``, imported on first use with quiet logs and bounded threads.

    ``threads`` (``measure.threads``; 0 = TF's default) sets TF's intra-op pool and
    a single inter-op thread, as ORT sessions do. TF fixes its pools when its
    runtime starts, so only the first call's value takes effect; a later different
    value is logged rather than silently assumed.
    """
    global _TF_THREADS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    backend = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise ConfigError(
            f"model.framework: keras runs on the TensorFlow backend, but KERAS_BACKEND={backend!r}; "
            "unset it or set KERAS_BACKEND=tensorflow"
        )
    try:
        with _quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow as tf
            import keras
    except ImportError as exc:
        raise ConfigError(f"model.framework: keras needs TensorFlow and Keras ({exc}); install the extra: "
                          f"{KERAS_EXTRA_HINT}") from exc
    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"model.framework: Keras was already imported with the {keras.backend.backend()!r} "
                          "backend; precision-search needs KERAS_BACKEND=tensorflow")
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    if threads is not None and threads != _TF_THREADS:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1 if threads else 0)
            _TF_THREADS = threads
        except RuntimeError:  # runtime already initialised
            if _TF_THREADS is None:
                _TF_THREADS = tf.config.threading.get_intra_op_parallelism_threads()
            if _TF_THREADS != threads:
                log.info("TensorFlow thread pools already started with %s threads; %s requested",
                         _TF_THREADS, threads)
    global _GPUS_CONFIGURED
    if not _GPUS_CONFIGURED:
        # TF would otherwise reserve all GPU memory on first use, starving ONNX Runtime /
        # TensorRT in the same trial process. (Listing devices initialises CUDA: quiet.)
        _GPUS_CONFIGURED = True
        with _quiet_stderr():
            for gpu in tf.config.list_physical_devices("GPU"):
                try:
                    tf.config.experimental.set_memory_growth(gpu, True)
                except RuntimeError:  # already initialised
                    pass
    return tf, keras
