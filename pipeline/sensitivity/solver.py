"""Plans from a sensitivity table: the AutoQuantize / HAWQ-V3 step, then measured for real.

Model: a plan's drop is the sum of its layers' single-layer drops (negative ones count as 0), its
size the sum of ``params x bits``. Two exact solves with ``scipy.optimize.milp`` (one binary per
layer x allowed format, one format per layer):

* at a **bits budget** (average weight bits over the quantizable layers): least predicted drop;
* at the **accuracy budget**: fewest bits whose predicted drop stays inside it;

plus the greedy **least-sensitive-first** sequence (repeatedly take the move with the smallest
drop per bit saved), thinned to a few plans. Layers can be solved in groups (one format per
group, as the grouped search space samples them). Every plan is a prediction; the search
measures each one on the artifact like any other trial.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.formats import WEIGHT_BITS, Format
from pipeline.plan import QuantPlan
from pipeline.sensitivity.table import SensitivityTable

TIE_BREAK = 1e-3
"""Weight of the secondary goal, relative to the primary one's range. At a bits budget, among
plans with (near-)equal predicted drop, prefer the one using more of the budget: subset drops of
0 are not proof of none, so spare bits go to precision. At the accuracy budget, among equally
small plans, prefer the lower predicted drop. Drop differences under 0.1% of the largest drop
are below what an eval subset resolves anyway."""


def prune_formats(sensitivity: SensitivityTable, accuracy_budget: float | None,
                  allowed: Mapping[str, Sequence[Format]] | None = None) -> dict[str, list[Format]]:
    """Per layer, the formats whose single-layer drop is within ``accuracy_budget`` (FP32 always).

    A format that alone already costs more than the whole budget cannot be in a feasible plan
    (under the additive model; a measured single-layer drop is not a prediction). Formats not
    measured for a layer are kept only if ``allowed`` lists them (the table cannot judge them).
    """
    out: dict[str, list[Format]] = {}
    for layer in sensitivity.layers:
        base = list(allowed[layer]) if allowed and layer in allowed else [Format.FP32, *sensitivity.formats]
        keep = []
        for f in base:
            f = Format(f)
            if f is Format.FP32 or accuracy_budget is None:
                keep.append(f)
                continue
            cell = sensitivity.cell(layer, f)
            if cell is None:
                keep.append(f)  # not measured: nothing to prune on
            elif cell.decisive_drop is not None and cell.decisive_drop <= accuracy_budget:
                keep.append(f)
        out[layer] = keep if Format.FP32 in keep else [Format.FP32, *keep]
    return out


def predicted_drop(sensitivity: SensitivityTable, plan: QuantPlan) -> float:
    """Additive predicted drop of ``plan`` (see :meth:`SensitivityTable.predicted_drop`)."""
    return sensitivity.predicted_drop(plan)


def _groups(sensitivity: SensitivityTable, groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    if groups:
        return {g: list(members) for g, members in groups.items()}
    return {n: [n] for n in sensitivity.layers}


def _options(sensitivity, groups, allowed) -> list[tuple[str, list[tuple[Format, float, float]]]]:
    """Per group: (format, predicted drop, weight bits) for every format allowed on all its layers."""
    opts = []
    for g, members in groups.items():
        fmts = [Format.FP32, *sensitivity.formats]
        if allowed:
            fmts = [f for f in fmts if all(f in allowed.get(m, fmts) for m in members)]
        rows = []
        for f in fmts:
            drop = sum(max(sensitivity.drop(m, f), 0.0) for m in members)
            if math.isfinite(drop):
                bits = sum(sensitivity.cost(m).params * WEIGHT_BITS[f] for m in members)
                rows.append((f, drop, float(bits)))
        opts.append((g, rows))
    return opts


def _milp(opts, *, max_bits: float | None = None, max_drop: float | None = None,
          minimise: str = "drop") -> dict[str, Format] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(gi, oi) for gi, (_, rows) in enumerate(opts) for oi in range(len(rows))]
    if not index:
        return None
    drops = np.array([opts[g][1][o][1] for g, o in index])
    bits = np.array([opts[g][1][o][2] for g, o in index])
    bit_scale = max(bits.max(), 1.0)
    drop_scale = max(drops.max(), 1e-12)
    if minimise == "drop":
        c = drops / drop_scale - TIE_BREAK * bits / (bit_scale * len(opts))
    else:
        c = bits / bit_scale + TIE_BREAK * drops / drop_scale
    one = np.zeros((len(opts), len(index)))
    for j, (g, _) in enumerate(index):
        one[g, j] = 1.0
    cons = [LinearConstraint(one, 1, 1)]
    if max_bits is not None:
        cons.append(LinearConstraint(bits[None, :], -np.inf, max_bits))
    if max_drop is not None:
        cons.append(LinearConstraint(drops[None, :], -np.inf, max_drop + 1e-12))
    res = milp(c, constraints=cons, integrality=np.ones(len(index)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 1e-9})
    if not res.success or res.x is None:
        return None
    return {opts[g][0]: opts[g][1][o][0] for (g, o), x in zip(index, res.x) if x > 0.5}


def _expand(choice: dict[str, Format], groups: dict[str, list[str]]) -> dict[str, Format]:
    return {m: f for g, f in choice.items() for m in groups[g]}


def solve_bits_budget(sensitivity, avg_bits: float, *, groups=None, allowed=None) -> dict[str, Format] | None:
    """Least predicted drop with average weight bits <= ``avg_bits``; None if no plan fits."""
    gs = _groups(sensitivity, groups)
    total = sum(sensitivity.cost(n).params for n in sensitivity.layers)
    choice = _milp(_options(sensitivity, gs, allowed), max_bits=avg_bits * total)
    return _expand(choice, gs) if choice else None


def solve_accuracy_budget(sensitivity, max_drop: float, *, groups=None, allowed=None) -> dict[str, Format] | None:
    """Fewest weight bits with predicted drop <= ``max_drop``."""
    gs = _groups(sensitivity, groups)
    choice = _milp(_options(sensitivity, gs, allowed), max_drop=max_drop, minimise="bits")
    return _expand(choice, gs) if choice else None


def greedy_sequence(sensitivity, *, groups=None, allowed=None) -> list[tuple[dict[str, Format], float, float]]:
    """Least sensitive first: from the widest plan, repeatedly the move (one group to a smaller format)
    with the least added drop per bit saved. Returns (formats, predicted drop, avg bits) per step."""
    gs = _groups(sensitivity, groups)
    opts = dict(_options(sensitivity, gs, allowed))
    total = max(sum(sensitivity.cost(n).params for n in sensitivity.layers), 1)
    # Start from each group's widest allowed format (FP32 unless pinned or ruled out).
    state = {g: max(opts[g], key=lambda o: (o[2], -o[1])) for g in gs if opts[g]}
    seq = []
    while True:
        best = None
        for g, (f, d, b) in state.items():
            for nf, nd, nb in opts[g]:
                if nb >= b:
                    continue
                score = (nd - d) / (b - nb)
                if best is None or score < best[0]:
                    best = (score, g, (nf, nd, nb))
        if best is None:
            break
        state[best[1]] = best[2]
        drop = sum(v[1] for v in state.values())
        bits = sum(v[2] for v in state.values()) / total
        seq.append((_expand({g: v[0] for g, v in state.items()}, gs), drop, bits))
    return seq


def _plan(formats: dict[str, Format], layer_order: list[str], knobs: Mapping | None) -> QuantPlan:
    return QuantPlan(layers={glob.escape(n): formats[n] for n in layer_order}, **dict(knobs or {}))


def seed_plans(sensitivity: SensitivityTable, budgets: Sequence[float], *, max_drop: float | None = None,
               groups: Mapping[str, Sequence[str]] | None = None,
               allowed: Mapping[str, Sequence[Format]] | None = None, greedy: int = 3,
               knobs: Mapping | None = None) -> list[QuantPlan]:
    """Plans to seed a search with, best guesses first, without duplicates:

    the accuracy-budget solve (smallest plan predicted to stay within ``max_drop``), one solve per
    bits budget (average weight bits), and ``greedy`` plans spread over the greedy sequence up to
    the accuracy budget. ``allowed``: per-layer formats (e.g. from :func:`prune_formats` and the
    backend's native formats); ``knobs``: plan-wide settings (int8 activations, calibration, ...).
    """
    order = sensitivity.layers
    found: list[dict[str, Format]] = []
    if max_drop is not None:
        found.append(solve_accuracy_budget(sensitivity, max_drop, groups=groups, allowed=allowed))
    for b in budgets:
        found.append(solve_bits_budget(sensitivity, b, groups=groups, allowed=allowed))
    if greedy:
        seq = [s for s in greedy_sequence(sensitivity, groups=groups, allowed=allowed)
               if max_drop is None or s[1] <= max_drop]
        if seq:
            picks = sorted({round((i + 1) * len(seq) / greedy) - 1 for i in range(greedy)})
            found += [seq[i][0] for i in picks if i >= 0]
    plans, seen = [], set()
    for f in found:
        if not f or all(v is Format.FP32 for v in f.values()):
            continue
        key = tuple(f[n].value for n in order)
        if key not in seen:
            seen.add(key)
            plans.append(_plan(f, order, knobs))
    return plans
