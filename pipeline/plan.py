"""A quantization plan: which format each layer gets, and how.

Plans are written by users (``plan.yaml``) and by the search. Layer keys are
glob patterns matched in order, first match wins, so ``{"fc1": int4, "*": int8}``
reads the way it looks. :meth:`QuantPlan.resolve` turns the patterns into one
concrete :class:`LayerChoice` per layer of a model; everything downstream
(quantizer, QAT, reports) consumes the resolved form only.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.formats import INT4_BLOCK_SIZES, Calibration, Format, Int8Activations


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

    def resolve(self, layer_names: list[str], default: Format = Format.FP32) -> dict[str, LayerChoice]:
        """One concrete choice per layer; layers matched by no pattern get ``default``.

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
                "(run `precision-search layers --config ...` to list them)"
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
        return out

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
        """Compact one-line description, e.g. ``fc1=int4 fc2=int8(dyn)``."""
        parts = []
        for name, c in self.resolve(layer_names).items():
            tag = c.format.value
            if c.format is Format.INT8 and c.int8_activations is Int8Activations.DYNAMIC:
                tag += "(dyn)"
            if c.format is Format.INT4:
                tag += f"(b{c.int4_block_size})"
            parts.append(f"{name}={tag}")
        return " ".join(parts)
