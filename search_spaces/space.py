"""A config's ``search:`` section as an Optuna search space over quantization plans.

One function decides, from a value getter, which parameters a plan has and what
plan they make (:meth:`SearchSpace._build`). Sampling (``suggest``: the getter is
``trial.suggest_*``) and rebuilding a plan from stored parameters
(``plan_from_params``: the getter reads a dict) share it, so a trial's Optuna
parameters always rebuild exactly the plan that was measured; ``params_for``
goes the other way for enqueueing fixed trials (the uniform baselines, retries).

Parameters (conditional ones only exist when they change the artifact, so the
sampler does not waste its model on knobs that do nothing):

- ``layer:<name>``: categorical over ``search.formats``, one per searched layer
  (layers matched by ``search.pin`` are fixed, ``search.exclude`` stay FP32); with
  ``search.group_layers`` one ``group:<key>`` per group of layers instead;
- ``method``: ptq | qat, when the config allows more than one;
- ``int8_activations``: when some layer is int8;
- ``calibration``: when some layer has calibrated activations (static int8, fp8);
- ``int4_block_size``: when some layer is int4;
- ``qat_steps``, ``qat_learning_rate``: when the method is qat.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, SearchSpec
from pipeline.formats import TARGET_INT8_ACTIVATIONS, Calibration, Format, Int8Activations, QuantTarget
from pipeline.formats import registry as format_registry
from pipeline.plan import LayerChoice, QATSettings, QuantPlan
from search_spaces.pruning import GROUP_PREFIX, LAYER_PREFIX, LayerChoices, layer_choices  # noqa: F401 - re-exported

P_METHOD = "method"
P_INT8_ACT = "int8_activations"
P_CALIBRATION = "calibration"
P_INT4_BLOCK = "int4_block_size"
P_QAT_STEPS = "qat_steps"
P_QAT_LR = "qat_learning_rate"

# get(name, kind, choices_or_bounds) -> value; kind is "categorical" or "loguniform".
Getter = Callable[[str, str, Any], Any]


def _first_match(name: str, patterns: Sequence[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


@dataclass(frozen=True)
class SearchSpace:
    """The searched layers and knobs of one config over one model's layer table."""

    spec: SearchSpec
    layer_names: tuple[str, ...]
    searched: tuple[str, ...]
    pinned: dict[str, Format]  # layer -> fixed format (search.pin)
    excluded: tuple[str, ...]  # layers kept FP32 (search.exclude)
    target: QuantTarget = QuantTarget.ORT  # the quantizer's graph forms (the backend's)
    narrowed: tuple[str, ...] = ()  # what the target removed from the config's choices, for describe()
    # Per searched parameter (a layer, or a group of layers), its formats after leaving out the
    # backend's emulated ones and the sensitivity-pruned ones (search_spaces/pruning.py).
    choices: LayerChoices | None = None

    @classmethod
    def build(cls, spec: SearchSpec, layer_names: Sequence[str],
              target: QuantTarget | str = QuantTarget.ORT, *,
              emulated: Mapping[str, set[Format]] | None = None,
              allowed: Mapping[str, Sequence[Format]] | None = None) -> "SearchSpace":
        """Check pins/excludes against the real layers; errors name the field and the layers.

        ``target`` (the backend's :attr:`~pipeline.backends.base.Backend.quant_target`) removes
        choices its graph forms cannot express, so the sampler never proposes a plan that can only
        fail: for TensorRT, int8 with dynamic activations.

        ``emulated`` (layer -> formats the backend only emulates for it, from
        :func:`pipeline.sensitivity.emulated_formats`) leaves those out unless
        ``search.include_emulated``; ``allowed`` (layer -> formats, from
        :func:`pipeline.sensitivity.prune_formats`) narrows each layer further.
        """
        target = QuantTarget(target)
        narrowed: list[str] = []
        allowed_act = [a for a in spec.int8_activations if a in TARGET_INT8_ACTIVATIONS[target]]
        if len(allowed_act) < len(spec.int8_activations):
            dropped = [a.value for a in spec.int8_activations if a not in allowed_act]
            if not allowed_act and Format.INT8 in spec.formats:
                raise ConfigError(
                    f"search.int8_activations: {dropped} cannot be built for backend target {target} "
                    f"(supported: {[a.value for a in TARGET_INT8_ACTIVATIONS[target]]}); set [static]"
                )
            if allowed_act:
                spec = spec.model_copy(update={"int8_activations": allowed_act})
                narrowed.append(f"int8_activations {dropped} (not buildable for {target})")
        names = list(layer_names)
        if not names:
            raise ConfigError("model: the model has no quantizable layers (run `precision-search layers`)")
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        for field, patterns in (("search.pin", list(spec.pin)), ("search.exclude", spec.exclude)):
            unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unused:
                raise ConfigError(
                    f"{field}: pattern(s) {unused} match no quantizable layer; layers are: {shown} "
                    "(run `precision-search layers --config ...`)"
                )
        pinned: dict[str, Format] = {}
        excluded: list[str] = []
        searched: list[str] = []
        for n in names:
            ex = _first_match(n, spec.exclude)
            pin = _first_match(n, list(spec.pin))
            if ex and pin:
                raise ConfigError(
                    f"search.pin / search.exclude: layer {n!r} is both pinned ({pin!r}) and excluded ({ex!r}); "
                    "keep one of them"
                )
            if ex:
                excluded.append(n)
            elif pin:
                pinned[n] = Format(spec.pin[pin])
            else:
                searched.append(n)
        if not searched:
            raise ConfigError(
                "search.pin / search.exclude: every layer is pinned or excluded, nothing is left to search; "
                "remove some patterns or use `precision-search evaluate` for a fixed plan"
            )
        choices = layer_choices(spec, searched, emulated=emulated, allowed=allowed)
        return cls(spec=spec, layer_names=tuple(names), searched=tuple(searched), pinned=pinned,
                   excluded=tuple(excluded), target=target, narrowed=tuple(narrowed), choices=choices)

    # -- the one definition of the space -------------------------------------
    def _build(self, get: Getter) -> QuantPlan:
        spec = self.spec
        fmt: dict[str, Format] = {}
        for n in self.layer_names:
            if n in self.excluded:
                fmt[n] = Format.FP32
            elif n in self.pinned:
                fmt[n] = self.pinned[n]
        for param, members in self._choices.groups.items():
            options = [f.value for f in self._choices.formats[param]]
            chosen = Format(get(param, "categorical", options))
            fmt.update({n: chosen for n in members})
        used = set(fmt.values())

        methods = list(spec.methods)
        method = get(P_METHOD, "categorical", methods) if len(methods) > 1 else methods[0]

        int8_act = Int8Activations(spec.int8_activations[0])
        if Format.INT8 in used:
            int8_act = Int8Activations(self._choose(get, P_INT8_ACT, [a.value for a in spec.int8_activations]))

        calibration = Calibration(spec.calibrations[0])
        # THE calibrated rule (pipeline.formats): does any used format, with these knobs, need calibration?
        calibrated = format_registry.any_calibrated(LayerChoice(format=f, int8_activations=int8_act) for f in used)
        if calibrated:
            calibration = Calibration(self._choose(get, P_CALIBRATION, [c.value for c in spec.calibrations]))

        block = spec.int4_block_sizes[0]
        if Format.INT4 in used:
            block = int(self._choose(get, P_INT4_BLOCK, list(spec.int4_block_sizes)))

        qat = None
        if method == "qat":
            steps = int(self._choose(get, P_QAT_STEPS, list(spec.qat_steps)))
            lo, hi = spec.qat_learning_rates
            lr = float(get(P_QAT_LR, "loguniform", (lo, hi))) if hi > lo else float(lo)
            qat = QATSettings(steps=steps, learning_rate=lr, seed=spec.seed)

        return QuantPlan(
            method=method,
            calibration=calibration,
            int8_activations=int8_act,
            int4_block_size=block,
            layers={glob.escape(n): fmt[n] for n in self.layer_names},
            qat=qat,
        )

    @property
    def _choices(self) -> LayerChoices:
        return self.choices or layer_choices(self.spec, self.searched)

    @staticmethod
    def _choose(get: Getter, name: str, choices: list) -> Any:
        """A categorical that only becomes a parameter when there is a choice to make."""
        return get(name, "categorical", choices) if len(choices) > 1 else choices[0]

    # -- the three uses ------------------------------------------------------
    def suggest(self, trial) -> QuantPlan:
        """Sample a plan from an Optuna trial (define-by-run)."""

        def get(name: str, kind: str, arg: Any) -> Any:
            if kind == "loguniform":
                return trial.suggest_float(name, arg[0], arg[1], log=True)
            return trial.suggest_categorical(name, arg)

        return self._build(get)

    def plan_from_params(self, params: dict[str, Any]) -> QuantPlan:
        """The plan a trial with these Optuna parameters measured.

        Missing parameters must be ones the space did not ask for; a missing
        parameter the space needs is an error (the params belong to another space).
        """

        def get(name: str, kind: str, arg: Any) -> Any:
            if name not in params:
                raise KeyError(f"parameter {name!r} missing: these params do not come from this search space")
            value = params[name]
            if kind == "categorical" and value not in arg:
                raise ValueError(f"parameter {name!r}={value!r} is not one of {arg}")
            return value

        return self._build(get)

    def params_for(self, layer_formats: dict[str, Format], *, method: str | None = None,
                   int8_activations: Int8Activations | None = None, calibration: Calibration | None = None,
                   int4_block_size: int | None = None) -> dict[str, Any]:
        """Optuna parameters giving these formats for the searched layers (for ``enqueue_trial``).

        Knobs not given take the config's first choice, so a fixed trial is
        deterministic. Formats must be allowed by ``search.formats``.
        """
        values: dict[str, Any] = self._choices.params_for(layer_formats)
        preferred = {
            P_METHOD: method or ("ptq" if "ptq" in self.spec.methods else self.spec.methods[0]),
            P_INT8_ACT: Int8Activations(int8_activations or self.spec.int8_activations[0]).value,
            P_CALIBRATION: Calibration(calibration or self.spec.calibrations[0]).value,
            P_INT4_BLOCK: int(int4_block_size or self.spec.int4_block_sizes[0]),
            P_QAT_STEPS: self.spec.qat_steps[0],
            P_QAT_LR: float(self.spec.qat_learning_rates[0]),
        }
        out: dict[str, Any] = {}

        def get(name: str, kind: str, arg: Any) -> Any:
            value = values[name] if name in values else preferred[name]
            out[name] = value
            return value

        self._build(get)
        return out

    def uniform_baselines(self) -> dict[str, dict[str, Any]]:
        """``uniform-<fmt>`` -> params, for every allowed format (FP32 first: the reference).

        Pinned and excluded layers keep their fixed formats in every baseline:
        the baselines answer "one format for everything the search may touch".

        INT8 gets one baseline per allowed activation mode, because static and dynamic INT8 are
        different artifacts with different kernels (on ORT CPU dynamic is often the fast one for
        encoders, static for CNNs): ``uniform-int8`` is the first mode listed in
        ``search.int8_activations`` (the label existing studies already hold), every further mode
        is ``uniform-int8-<mode>``, e.g. ``uniform-int8-dynamic``.
        """
        out: dict[str, dict[str, Any]] = {}
        for f in (f for f in Format if f in set(self.spec.formats) and self._choices.everywhere(f)):
            every = {n: f for n in self.searched}
            out[f"uniform-{f.value}"] = self.params_for(every)
            if f is Format.INT8:
                for mode in self.spec.int8_activations[1:]:
                    mode = Int8Activations(mode)
                    out[f"uniform-int8-{mode.value}"] = self.params_for(every, int8_activations=mode)
        return out

    def describe(self) -> str:
        """One line for logs and the parent run."""
        parts = [f"{len(self.searched)} searched layer(s) x {[f.value for f in self.spec.formats]}"]
        if self.pinned:
            parts.append("pinned: " + ", ".join(f"{n}={f.value}" for n, f in self.pinned.items()))
        if self.excluded:
            parts.append("excluded (fp32): " + ", ".join(self.excluded))
        if self.narrowed:
            parts.append("removed for the backend: " + ", ".join(self.narrowed))
        parts += list(self._choices.notes)
        return "; ".join(parts)
