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

Bits are not time. Once the uniform baselines have said how fast each format runs on this backend
(:mod:`pipeline.sensitivity.speed`), :func:`speed_plans` adds the solves AutoQuantize-style bits
budgets miss, with predicted latency as a third linear term: the **fastest** plan predicted to stay
within the accuracy budget, the **smallest** plan at about that speed, and the **least-drop** plan at
a few latency budgets. On ORT CPU that is what separates dynamic INT8 (fast) from INT4 (small, at
about FP32 speed), which a bits-only solver would trade as if equal.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.formats import WEIGHT_BITS, Format
from pipeline.plan import QuantPlan
from pipeline.sensitivity.speed import FormatSpeed
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


def _options(sensitivity, groups, allowed, speed: FormatSpeed | None = None
             ) -> list[tuple[str, list[tuple[Format, float, float, float]]]]:
    """Per group: (format, predicted drop, weight bits, predicted latency share) for every format allowed on
    all its layers. The latency share (the group's share of FP32 latency x the format's speed ratio) is 0
    without ``speed``; with it, a format with no measured ratio is left out (it cannot be judged)."""
    opts = []
    for g, members in groups.items():
        fmts = [Format.FP32, *sensitivity.formats]
        if allowed:
            fmts = [f for f in fmts if all(f in allowed.get(m, fmts) for m in members)]
        rows = []
        for f in fmts:
            drop = sum(max(sensitivity.drop(m, f), 0.0) for m in members)
            ratio = speed.ratio(f) if speed is not None else 0.0
            if math.isfinite(drop) and ratio is not None:
                bits = sum(sensitivity.cost(m).params * WEIGHT_BITS[f] for m in members)
                latency = sum(sensitivity.cost(m).latency_share for m in members) * ratio
                rows.append((f, drop, float(bits), float(latency)))
        opts.append((g, rows))
    return opts


_OBJECTIVES = {"drop": 1, "bits": 2, "latency": 3}
_TIE = {"drop": ("bits", -1.0), "bits": ("drop", 1.0), "latency": ("bits", 1.0)}
"""Per objective, the secondary goal and its sign (see :data:`TIE_BREAK`): least drop -> use more of the
bits budget; fewest bits -> lower drop; fastest -> fewer bits (equal-speed plans differ in size)."""


def _milp(opts, *, max_bits: float | None = None, max_drop: float | None = None,
          max_latency: float | None = None, minimise: str = "drop") -> dict[str, Format] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(gi, oi) for gi, (_, rows) in enumerate(opts) for oi in range(len(rows))]
    if not index:
        return None
    cols = {name: np.array([opts[g][1][o][k] for g, o in index]) for name, k in _OBJECTIVES.items()}
    scaled = {name: v / max(v.max(), 1e-12) for name, v in cols.items()}
    tie, sign = _TIE[minimise]
    per_group = len(opts) if (minimise, tie) == ("drop", "bits") else 1
    c = scaled[minimise] + sign * TIE_BREAK * scaled[tie] / per_group
    one = np.zeros((len(opts), len(index)))
    for j, (g, _) in enumerate(index):
        one[g, j] = 1.0
    cons = [LinearConstraint(one, 1, 1)]
    for name, bound in (("bits", max_bits), ("drop", max_drop), ("latency", max_latency)):
        if bound is not None:
            cons.append(LinearConstraint(cols[name][None, :], -np.inf, bound + 1e-12))
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
    state = {g: max(opts[g], key=lambda o: (o[2], -o[1]))[:3] for g in gs if opts[g]}
    seq = []
    while True:
        best = None
        for g, (f, d, b) in state.items():
            for nf, nd, nb, _ in opts[g]:
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
    return _distinct(found, order, knobs)


def _distinct(found, order: list[str], knobs: Mapping | None) -> list[QuantPlan]:
    """Plans in order without repeats and without the all-FP32 plan."""
    plans, seen = [], set()
    for f in found:
        if not f or all(v is Format.FP32 for v in f.values()):
            continue
        key = tuple(f[n].value for n in order)
        if key not in seen:
            seen.add(key)
            plans.append(_plan(f, order, knobs))
    return plans


def predicted_latency(sensitivity: SensitivityTable, speed: FormatSpeed, plan: QuantPlan) -> float | None:
    """The plan's predicted latency as a share of FP32's over the table's layers (see
    :mod:`pipeline.sensitivity.speed`); None if it uses a format with no measured ratio."""
    total = 0.0
    for n, c in plan.resolve(sensitivity.layers).items():
        r = speed.ratio(c.format)
        if r is None:
            return None
        total += sensitivity.cost(n).latency_share * r
    return total


def speed_plans(sensitivity: SensitivityTable, speed: FormatSpeed, *, max_drop: float | None,
                latency_budgets: Sequence[float] = (1.1, 1.3), groups: Mapping[str, Sequence[str]] | None = None,
                allowed: Mapping[str, Sequence[Format]] | None = None, knobs: Mapping | None = None) -> list[QuantPlan]:
    """Seeds that weigh time as measured here, best guesses first, without duplicates:

    the fastest plan predicted within ``max_drop``; then for each budget ``b`` in ``latency_budgets``
    (multiples of that plan's predicted latency, kept below FP32's) the smallest plan within ``max_drop``
    that fast and the least-drop plan that fast. Together they cover the fast corner of the front
    (accuracy x latency x size) that bits budgets alone leave to chance.
    """
    gs = _groups(sensitivity, groups)
    opts = _options(sensitivity, gs, allowed, speed)
    fastest = _milp(opts, max_drop=max_drop, minimise="latency")
    if not fastest:
        return []
    lat = sum(next(r[3] for r in rows if r[0] is fastest[g]) for g, rows in opts)
    whole = sum(sensitivity.cost(n).latency_share for n in sensitivity.layers)  # the FP32 plan's
    if lat >= whole * (1 - 1e-9):
        return []  # nothing runs faster than FP32 here: the bits-budget seeds already cover size
    found = [fastest]
    for b in latency_budgets:
        cap = b * lat
        if cap >= whole:
            continue  # no faster than FP32: nothing the speed solves add
        found.append(_milp(opts, max_drop=max_drop, max_latency=cap, minimise="bits"))
        found.append(_milp(opts, max_latency=cap, minimise="drop"))
    return _distinct([_expand(f, gs) if f else None for f in found], sensitivity.layers, knobs)
