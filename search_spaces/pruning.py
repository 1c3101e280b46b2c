"""Which formats each searched layer may take, and which layers share one choice.

Kept apart from :mod:`search_spaces.space` (which turns choices into Optuna parameters) because
this is where trials are saved before they are spent:

* formats the backend only **emulates** for a layer (bf16/fp8 on ORT CPU: stored in the format,
  computed in fp32, slower than fp32) are left out where a native format is as small, unless
  ``search.include_emulated: true`` (an emulated format that is the only way to fewer bits stays);
* formats whose **single-layer drop** already exceeds the accuracy budget are pruned per layer
  (``allowed``, from :func:`pipeline.sensitivity.prune_formats`);
* with ``search.group_layers`` several layers share one parameter (``block``: the same name up to
  its last numeric index, e.g. ``encoder.layer.3.*``; ``role``: the same name with every index
  wildcarded, e.g. every block's ``attention.self.query``), so a 36-layer encoder becomes 6 or 12
  choices.

Pure: the caller computes ``emulated`` from the backend and ``allowed`` from the sensitivity table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.config import SearchSpec
from pipeline.formats import WEIGHT_BITS, Format
from pipeline.plan import role_pattern

LAYER_PREFIX = "layer:"
GROUP_PREFIX = "group:"


@dataclass(frozen=True)
class LayerChoices:
    groups: dict[str, tuple[str, ...]]  # parameter name -> the layers it sets
    formats: dict[str, tuple[Format, ...]]  # parameter name -> its formats
    notes: tuple[str, ...] = field(default=())  # one line per thing left out, for describe()

    def everywhere(self, fmt: Format) -> bool:
        """``fmt`` can be given to every searched layer (a uniform plan in this space)."""
        return all(Format(fmt) in fs for fs in self.formats.values())

    def params_for(self, layer_formats: Mapping[str, Format]) -> dict[str, str]:
        """The parameter values giving these formats; errors name the layer and what it allows."""
        out: dict[str, str] = {}
        for param, members in self.groups.items():
            got = {Format(layer_formats[n]) for n in members}
            if len(got) > 1:
                raise ValueError(f"layers {list(members)} share {param!r} (search.group_layers) but were given "
                                 f"different formats {sorted(f.value for f in got)}")
            f = got.pop()
            if f not in self.formats[param]:
                raise ValueError(f"format {f.value} for layer {members[0]!r} is not in search.formats as narrowed for "
                                 f"it: {[a.value for a in self.formats[param]]} (search.formats, minus the backend's "
                                 "emulated formats and the sensitivity-pruned ones)")
            out[param] = f.value
        return out


def group_key(name: str, mode: str) -> str:
    """The group a layer belongs to under ``search.group_layers``."""
    if mode == "layer":
        return name
    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numeric:
        return name  # a layer outside any repeated block keeps its own choice
    if mode == "block":
        return ".".join(parts[: numeric[-1] + 1])
    return role_pattern(name)


AUTO_GROUP_MIN_LAYERS = 24
"""``group_layers: auto`` groups by role above this many searched layers (and only where roles at least
halve the choices): the budget a user gives a search (tens of trials) cannot learn more independent choices."""


def group_mode(spec: SearchSpec, searched: Sequence[str]) -> str:
    """The grouping ``search.group_layers`` means for these searched layers (``auto`` resolved)."""
    mode = getattr(spec, "group_layers", "layer")
    if mode != "auto":
        return mode
    if len(searched) <= AUTO_GROUP_MIN_LAYERS:
        return "layer"
    roles = {group_key(n, "role") for n in searched}
    return "role" if 2 * len(roles) <= len(searched) else "layer"


def dominated_emulated(formats: Sequence[Format], emulated: set[Format]) -> list[Format]:
    """The formats of ``formats`` a layer leaves out: emulated on this backend (stored, computed in fp32,
    slower than fp32) while a native one of them stores as few bits. An emulated format that is the only way
    to a smaller layer (int4 on a Conv, beside native int8) is kept: size may want it. One rule for the
    search space (:func:`layer_choices`) and the sensitivity seeding's allowed formats."""
    native_bits = [WEIGHT_BITS[Format(f)] for f in formats if f not in emulated]
    return [f for f in formats if f in emulated and native_bits and min(native_bits) <= WEIGHT_BITS[Format(f)]]


def layer_choices(spec: SearchSpec, searched: Sequence[str], *,
                  emulated: Mapping[str, set[Format]] | None = None,
                  allowed: Mapping[str, Sequence[Format]] | None = None) -> LayerChoices:
    include_emulated = getattr(spec, "include_emulated", False)
    mode = group_mode(spec, searched)
    per_layer: dict[str, list[Format]] = {}
    left_out: dict[Format, int] = {}
    pruned: dict[Format, list[str]] = {}
    emptied: list[str] = []
    for n in searched:
        fmts = list(spec.formats)
        if emulated and not include_emulated:
            # An emulated format costs time and buys nothing a native one does not: leave it out where a
            # native format here stores as few bits (bf16/fp8 beside native int8). Where it is the only way
            # to a smaller layer (int4 on a Conv, stored int4 and computed in fp32) it stays: size may want it.
            gone = dominated_emulated(fmts, emulated.get(n, set()))
            for f in gone:
                left_out[f] = left_out.get(f, 0) + 1
            fmts = [f for f in fmts if f not in gone]
        if allowed is not None and n in allowed:
            keep = {Format(f) for f in allowed[n]}
            for f in fmts:
                if f not in keep:
                    pruned.setdefault(f, []).append(n)
            fmts = [f for f in fmts if f in keep]
        if not fmts:
            emptied.append(n)
            fmts = [Format.FP32]
        per_layer[n] = fmts
    groups: dict[str, list[str]] = {}
    for n in searched:
        groups.setdefault(group_key(n, mode), []).append(n)
    params: dict[str, tuple[str, ...]] = {}
    formats: dict[str, tuple[Format, ...]] = {}
    for key, members in groups.items():
        param = LAYER_PREFIX + key if members == [key] else GROUP_PREFIX + key
        common = [f for f in per_layer[members[0]] if all(f in per_layer[m] for m in members)] or [Format.FP32]
        params[param], formats[param] = tuple(members), tuple(common)
    notes = []
    if left_out:
        notes.append("left out " + ", ".join(f"{f.value} ({c} layer{'s' if c > 1 else ''})" for f, c in left_out.items())
                     + ": the backend only emulates them (stored, computed in fp32, slower than fp32) and a native "
                     "format is as small there (set search.include_emulated: true to search them)")
    if pruned:
        notes.append("pruned by sensitivity (single-layer drop over search.max_accuracy_drop): "
                     + "; ".join(f"{f.value} on {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}"
                                 for f, ns in pruned.items()))
    if emptied:
        notes.append(f"no searched format left for {', '.join(emptied[:4])}{' ...' if len(emptied) > 4 else ''}: "
                     "kept fp32")
    if mode != "layer":
        why = (f" (search.group_layers: auto, more than {AUTO_GROUP_MIN_LAYERS} layers; set it to layer to search "
               "each one)") if getattr(spec, "group_layers", "") == "auto" else ""
        notes.append(f"{len(searched)} layers searched as {len(params)} {mode} group(s){why}")
    return LayerChoices(groups=params, formats=formats, notes=tuple(notes))
