"""precision-search: measured, per-layer, multi-objective precision search.

The package is organised one concept per module (see README "Design"):
formats and plans (what a candidate is), config (what the user asked for),
models (framework adapters that produce the FP32 ONNX reference and its layer
table), exporters (the one ONNX quantizer that defines deployed numerics),
backends/measure/energy (how a candidate is measured), study/pareto/tracking
(the search and its record), registry (promotion).

The Python API (:mod:`pipeline.api`) is exported here lazily (PEP 562), so ``import pipeline``
imports none of torch, onnxruntime, Optuna or Ray::

    import pipeline
    table = pipeline.layers(model, sample_inputs=x[:2])
    result = pipeline.evaluate(model, "int8", eval_data=x, targets=y, calibration=x_cal)
    summary = pipeline.search(model, calibration=x_cal, eval_data=x, targets=y, trials=12)

Three API names are also submodule names (``pipeline/layers.py``, ``pipeline/evaluate.py``, and
the ``pipeline/search/`` package of the refactor). Python binds a submodule onto its package when
it is imported, which would shadow the function in one import order and not the other; so the
package keeps :class:`_Api` handles under those names. A handle calls the API function, and
attribute access on it reaches the submodule (``pipeline.layers.LayerTable`` still works);
``from pipeline.layers import X`` never involves it.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = ("layers", "quantize", "evaluate", "search")
__all__ = ["__version__", *_API]
_MODULE_DUNDERS = ("__name__", "__file__", "__path__", "__spec__", "__package__", "__loader__", "__all__")


class _Api:
    """``pipeline.<name>``: calls :mod:`pipeline.api`'s function; attributes are the submodule's."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("pipeline.api"), self._name)(*args, **kwargs)

    def _module(self) -> types.ModuleType:
        try:
            return importlib.import_module(f"pipeline.{self._name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pipeline.{self._name}":
                raise
            raise AttributeError(f"pipeline.{self._name} is the API function (there is no such submodule)") from None

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr not in _MODULE_DUNDERS:
            raise AttributeError(attr)  # copy/pickle protocols etc. are not the submodule's
        return getattr(self._module(), attr)

    def __setattr__(self, attr: str, value) -> None:  # e.g. a test patching pipeline.evaluate.Evaluator
        setattr(self._module(), attr, value)

    @property
    def __doc__(self):  # help(pipeline.search) shows the function's documentation
        return getattr(importlib.import_module("pipeline.api"), self._name).__doc__

    @property
    def __wrapped__(self):
        return getattr(importlib.import_module("pipeline.api"), self._name)

    def __repr__(self) -> str:
        return f"<pipeline API function {self._name}>"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # a submodule being bound by the import system: the _Api handle stays
        super().__setattr__(name, value)


for _name in _API:
    globals()[_name] = _Api(_name)
sys.modules[__name__].__class__ = _Package
del _name
