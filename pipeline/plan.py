"""A quantization plan: which format each layer gets, and how.

Plans are written by users (``plan.yaml``) and by the search. Layer keys are
glob patterns matched in order, first match wins, so ``{"fc1": int4, "*": int8}``
reads the way it looks. :meth:`QuantPlan.resolve` turns the patterns into one
:class:`ResolvedPlan` - a concrete :class:`LayerChoice` per layer of a model, plus the plan's
method/calibration/QAT settings - once per evaluation; everything downstream (quantizer, QAT,
TFLite, reports, the study's duplicate key) consumes that object and never resolves again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.formats import INT4_BLOCK_SIZES, Calibration, Format, Int8Activations
from pipeline.formats import registry as formats
from pipeline.hints import command


class LayerOverride(BaseModel):
    """Long form of a layer entry: a format plus per-layer knobs."""

    model_config = ConfigDict(extra="forbid")

    format: Format
    int8_activations: Int8Activations | None = None
    int4_block_size: int | None = None

    @field_validator("int4_block_size")
    @classmethod
    def _block(cls, v: int | None) -> int | None:
        if v is not None and v not in INT4_BLOCK_SIZES:
            raise ValueError(f"int4_block_size must be one of {list(INT4_BLOCK_SIZES)}, got {v}")
        return v


class QATSettings(BaseModel):
    """Budget of a QAT fine-tune (used when ``method: qat``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class LayerChoice(BaseModel):
    """The resolved, concrete choice for one layer."""

    model_config = ConfigDict(frozen=True)

    format: Format
    int8_activations: Int8Activations = Int8Activations.STATIC
    int4_block_size: int = 32


class QuantPlan(BaseModel):
    """A candidate: per-layer formats plus method and plan-wide defaults."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ptq", "qat"] = "ptq"
    calibration: Calibration = Calibration.MINMAX
    int8_activations: Int8Activations = Int8Activations.STATIC
    int4_block_size: int = 32
    layers: dict[str, Union[Format, LayerOverride]] = Field(default_factory=lambda: {"*": Format.FP32})
    qat: QATSettings | None = None

    @field_validator("int4_block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v not in INT4_BLOCK_SIZES:
            raise ValueError(f"int4_block_size must be one of {list(INT4_BLOCK_SIZES)}, got {v}")
        return v

    @model_validator(mode="after")
    def _qat_defaults(self) -> "QuantPlan":
        if self.method == "qat" and self.qat is None:
            self.qat = QATSettings()
        return self

    @classmethod
    def uniform(cls, fmt: Format | str, **kwargs) -> "QuantPlan":
        return cls(layers={"*": Format(fmt)}, **kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "QuantPlan":
        from pydantic import ValidationError

        from pipeline.errors import ConfigError, format_validation_error

        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source=str(path))) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def match(self, layer_name: str) -> tuple[str, LayerChoice] | None:
        """The first pattern matching ``layer_name`` and the choice it gives."""
        for pattern, entry in self.layers.items():
            if fnmatch.fnmatchcase(layer_name, pattern):
                return pattern, self._choice(entry)
        return None

    def resolve(self, layer_names: list[str], default: Format = Format.FP32) -> "ResolvedPlan":
        """One concrete choice per layer (a :class:`ResolvedPlan`, a mapping layer -> choice);
        layers matched by no pattern get ``default``.

        Raises ValueError when a pattern matches no layer at all, since that is
        almost always a typo in a layer name and silently ignoring it would
        measure a different plan than the user wrote; likewise when a pattern
        matches layers but an earlier pattern takes every one of them.
        """
        unused = [p for p in self.layers if not any(fnmatch.fnmatchcase(n, p) for n in layer_names)]
        if unused:
            raise ValueError(
                f"plan pattern(s) {unused} match no quantizable layer; "
                f"layers are: {layer_names[:20]}{' ...' if len(layer_names) > 20 else ''} "
                f"(list them: {command('layers', '--config', 'CONFIG.yaml')})"
            )
        out: dict[str, LayerChoice] = {}
        winners: set[str] = set()
        for name in layer_names:
            hit = self.match(name)
            out[name] = hit[1] if hit else self._choice(default)
            if hit:
                winners.add(hit[0])
        shadowed = [p for p in self.layers if p not in winners]
        if shadowed:
            # Matches layers but never wins: an earlier, broader pattern takes all of them (a dict
            # dumped with sorted keys puts "*" first, for one). Measuring would ignore the user's line.
            first = {p: self.match(next(n for n in layer_names if fnmatch.fnmatchcase(n, p)))[0] for p in shadowed}
            raise ValueError(
                "plan pattern(s) never apply, every layer they match is taken by an earlier pattern (first match "
                "wins; put broader patterns such as '*' last): "
                + ", ".join(f"{p!r} (taken by {first[p]!r})" for p in shadowed)
            )
        return ResolvedPlan(self, out)

    def _choice(self, entry: Format | LayerOverride) -> LayerChoice:
        if isinstance(entry, LayerOverride):
            return LayerChoice(
                format=entry.format,
                int8_activations=entry.int8_activations or self.int8_activations,
                int4_block_size=entry.int4_block_size or self.int4_block_size,
            )
        return LayerChoice(
            format=Format(entry),
            int8_activations=self.int8_activations,
            int4_block_size=self.int4_block_size,
        )

    def summary(self, layer_names: list[str]) -> str:
        """Compact one-line description, e.g. ``fc1=int4(b32) fc2=int8(dyn)`` (resolves; prefer
        :meth:`ResolvedPlan.summary` where the plan is already resolved)."""
        return self.resolve(layer_names).summary()


class ResolvedPlan(Mapping[str, LayerChoice]):
    """A plan applied to one model's layers: what one evaluation measures, resolved once.

    A read-only mapping layer name -> :class:`LayerChoice` in layer-table order (so code written
    for the plain dict ``resolve`` used to return keeps working), plus the plan it came from
    (``method``, ``calibration``, ``qat``) and what the rest of the code derives from it:
    :meth:`key` (the study's duplicate identity), :meth:`summary` and :meth:`tags` (reports,
    MLflow), :attr:`calibrated` (THE calibrated rule, asked of the format registry).
    """

    __slots__ = ("plan", "choices")

    def __init__(self, plan: QuantPlan, choices: dict[str, LayerChoice]):
        self.plan = plan
        self.choices = dict(choices)

    # -- Mapping
    def __getitem__(self, name: str) -> LayerChoice:
        return self.choices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __repr__(self) -> str:
        return f"ResolvedPlan({self.summary()!r}, method={self.method!r})"

    def __reduce__(self):  # pickles as (plan, choices) for Ray workers
        return (ResolvedPlan, (self.plan, self.choices))

    # -- the plan's settings
    @property
    def names(self) -> list[str]:
        return list(self.choices)

    @property
    def method(self) -> str:
        return self.plan.method

    @property
    def calibration(self) -> Calibration:
        return self.plan.calibration

    @property
    def qat(self) -> QATSettings | None:
        return self.plan.qat

    @property
    def calibrated(self) -> bool:
        """Some layer needs activation ranges, so ``calibration`` changes the artifact."""
        return formats.any_calibrated(self.choices.values())

    def formats(self) -> dict[str, Format]:
        return {n: c.format for n, c in self.choices.items()}

    # -- derived identities and text
    def key(self) -> str:
        """Identity of what the plan measures: its per-layer choices, method, calibration and QAT settings.

        Knobs that do not change the artifact are left out (int8 activation mode on a non-INT8
        layer, INT4 block size on a non-INT4 layer, calibration when nothing is calibrated), so
        two parameter sets building the same candidate get the same key.
        """
        layers = {name: {"format": c.format.value, **formats.family(c.format).key_knobs(c)}
                  for name, c in self.choices.items()}
        data = {"method": self.method, "layers": layers,
                "calibration": self.calibration.value if self.calibrated else None,
                "qat": self.qat.model_dump(mode="json") if self.qat is not None else None}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]

    def tags(self) -> dict[str, str]:
        """layer -> ``int8(dyn)``, ``int4(b32)``, ... (the notation of :meth:`summary`)."""
        return {name: formats.tag(c) for name, c in self.choices.items()}

    def summary(self) -> str:
        """Compact one-line description, e.g. ``fc1=int4(b32) fc2=int8(dyn)``."""
        return " ".join(f"{name}={t}" for name, t in self.tags().items())

    def brief(self, max_layers: int = 6, max_names: int = 3) -> str:
        """What a progress line, ``front`` and MLflow's ``plan_brief`` show: every layer when there are few,
        else the count per format and what differs from the nearest uniform baseline
        (``int8x33 fp32x3 · uniform int8 except 3 fp32 (encoder.layer.0.attention.*, classifier)``), then what
        decides the result besides formats (method, calibration where something is calibrated; activations
        are in the tags, ``int8(dyn)``). The full plan stays in ``summary()`` / MLflow / ``front --full``."""
        tags = self.tags()
        body = self.summary() if len(tags) <= max_layers else " ".join(
            f"{t}x{n}" for t, n in Counter(tags.values()).most_common()) + " · " + self.baseline_diff(max_names)
        knobs = [self.method] + ([f"calibration {self.calibration.value}"] if self.calibrated else [])
        return f"{body} [{', '.join(knobs)}]"

    def baseline_diff(self, max_names: int = 3) -> str:
        """How the plan differs from its nearest uniform baseline (the format most layers have; a tie goes to
        the one that comes first in layer order): ``uniform int8 except 3 fp32 (encoder.layer.0.attention.*,
        classifier)``. Layers are listed as glob patterns of the plan's own syntax: a dotted (or ``/``) prefix
        whose layers all differ the same way is one ``prefix.*``; at most ``max_names`` patterns, then
        ``+N more``."""
        tags = self.tags()
        base = Counter(tags.values()).most_common(1)[0][0]
        groups: dict[str, list[str]] = {}
        for name, tag in tags.items():
            if tag != base:
                groups.setdefault(tag, []).append(name)
        if not groups:
            return f"uniform {base}"
        parts, budget = [], max_names
        for tag, names in groups.items():
            patterns = layer_patterns(names, list(tags))
            shown, budget = patterns[:max(budget, 0)], budget - len(patterns)
            more = f"{', ' if shown else ''}+{len(patterns) - len(shown)} more" if len(shown) < len(patterns) else ""
            parts.append(f"{len(names)} {tag} ({', '.join(shown)}{more})" if shown else f"{len(names)} {tag}")
        return f"uniform {base} except {', '.join(parts)}"


def role_pattern(name: str) -> str:
    """``name`` with every numeric block index wildcarded (``enc.layer.3.query`` -> ``enc.layer.*.query``): the
    layer's role, what ``search.group_layers: role`` searches as one choice (``search_spaces.pruning.group_key``)
    and what a plan brief names when the role changed in every block."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


def layer_patterns(selected: list[str], all_names: list[str]) -> list[str]:
    """``selected`` layer names as few glob patterns: a role present in every block (``enc.layer.*.query``)
    when all its layers are selected; else the shortest ``prefix.*`` (split at ``.`` or ``/``) that matches two
    or more layers, all of them in ``selected``; else the name itself.
    In layer order, so the result is deterministic."""
    chosen = set(selected)
    out: list[str] = []
    covered: set[str] = set()
    for name in selected:
        if name in covered:
            continue
        pattern = name
        role = role_pattern(name)
        same_role = [n for n in all_names if role_pattern(n) == role]
        if role != name and len(same_role) > 1 and all(n in chosen for n in same_role):
            # the same role in every block (encoder.layer.*.attention.output.dense): one pattern, and the one
            # a role-grouped search varies
            covered.update(same_role)
            out.append(role)
            continue
        for i, ch in enumerate(name):
            if ch not in "./" or i == 0:
                continue
            under = [n for n in all_names if n.startswith(name[: i + 1])]
            if len(under) > 1 and all(n in chosen for n in under):
                pattern = name[: i + 1] + "*"
                covered.update(under)
                break
        covered.add(name)
        out.append(pattern)
    return out


def resolved(plan: QuantPlan | ResolvedPlan, layer_names: list[str]) -> ResolvedPlan:
    """``plan`` as resolved for ``layer_names``: a :class:`ResolvedPlan` is passed through as is
    (the evaluator resolves once and hands it down), a :class:`QuantPlan` is resolved here
    (callers that start from a user plan, such as tests and notebooks)."""
    if isinstance(plan, ResolvedPlan):
        if plan.names != list(layer_names):
            raise ValueError("the resolved plan was resolved for other layers than this model's layer table")
        return plan
    return plan.resolve(layer_names)
