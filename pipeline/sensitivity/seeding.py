"""What the search runner takes from sensitivity: seeds, per-layer formats, and a skip rule.

The runner (``pipeline.search.runner.StudyRunner``) calls, once at setup:

* :func:`space_inputs` -> ``emulated``/``allowed`` for ``SearchSpace.build`` (emulated formats are
  left out by default; pruned formats only when the search is seeded, see :func:`seed_decision`);
* :func:`sensitivity_seeds` -> plans to enqueue next to the uniform baselines;
* once the uniform baselines are measured, :meth:`Seeding.ordered_plans` -> those plans with the
  speed-aware ones (:func:`pipeline.sensitivity.solver.speed_plans`) in front, using how fast each
  format ran here;

and per proposal :meth:`Seeding.skip_reason` -> a reason to tell Optuna the trial is PRUNED
instead of dispatching it (its predicted drop already exceeds ``search.max_accuracy_drop``).
"""

from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass, field

from pipeline.config import SearchConfig
from pipeline.formats import Format
from pipeline.layers import LayerTable
from pipeline.plan import QuantPlan
from pipeline.sensitivity.emulation import emulated_formats
from pipeline.sensitivity.measure import build_sensitivity, plan_knobs, subset_config
from pipeline.sensitivity.solver import prune_formats, seed_plans, speed_plans
from pipeline.sensitivity.speed import FormatSpeed
from pipeline.sensitivity.table import SensitivityTable

log = logging.getLogger(__name__)

SKIP_MARGIN = 2.0
"""A proposal is skipped only when its predicted drop exceeds the budget by this factor: the
additive model over subset drops is a screen, and a trial it wrongly skips is a plan never seen."""


@dataclass
class Seeding:
    table: SensitivityTable | None
    plans: list[QuantPlan] = field(default_factory=list)
    allowed: dict[str, list[Format]] | None = None
    emulated: dict[str, set[Format]] = field(default_factory=dict)
    budget: float | None = None
    note: str = ""  # why the search runs unseeded, when it does (shown once, kept in the summary)
    charged_s: float = 0.0  # seconds of the search's time budget the table took (seed: auto)
    # What the speed-aware solves need (set by seeding_for): the solver's groups, the plans' knobs, the
    # pinned/excluded layers every seed names, and the latency budgets (search.sensitivity.latency_budgets).
    groups: dict[str, list[str]] = field(default_factory=dict)
    knobs: dict = field(default_factory=dict)
    held: dict[str, Format] = field(default_factory=dict)
    latency_budgets: list[float] = field(default_factory=list)
    speed: FormatSpeed | None = None  # set by ordered_plans once the uniform baselines are timed
    speed_seeds: int = 0  # how many of the ordered plans the speed-aware solves added

    def summary(self) -> str:
        """One line for the search summary: how the table took part, or why it did not."""
        if self.table is None:
            return self.note
        pruned = sum(1 for c in self.table.cells  # measured cells whose format the table ruled out
                     if self.allowed is not None and c.format not in self.allowed.get(c.layer, [c.format]))
        speed = (f" + {self.speed_seeds} speed-aware plan(s) ({self.speed.describe()})"
                 if self.speed is not None else "")
        return (f"seeded: {len(self.plans)} solver/greedy plan(s){speed} from the sensitivity table "
                f"({len(self.table.cells)} cells, {self.table.eval_label}"
                f"{', from the cache' if self.table.from_cache else ''}); {pruned} layer x format choice(s) pruned")

    def ordered_plans(self, speed: FormatSpeed | None) -> list[QuantPlan]:
        """The seeds to enqueue, in order: with ``speed`` (the uniform baselines' measured ratios) the fastest
        predicted-feasible plan first, then the smallest (the accuracy-budget solve), then the other speed-aware
        plans, then the bits budgets and the greedy plans; without it, :attr:`plans` as they are."""
        self.speed = speed
        if speed is None or self.table is None or not speed.ratios:
            self.speed_seeds = 0
            return list(self.plans)
        extra = speed_plans(self.table, speed, max_drop=self.budget, latency_budgets=self.latency_budgets,
                            groups=self.groups or None, allowed=self.allowed, knobs=self.knobs)
        extra = [_with_held(p, self.held) for p in extra]
        ordered, seen = [], set()
        for plan in [*extra[:1], *self.plans[:1], *extra[1:], *self.plans[1:]]:  # first occurrence wins
            key = tuple(c.format for c in plan.resolve(self.table.layers).values())
            if key not in seen:
                seen.add(key)
                ordered.append(plan)
        self.speed_seeds = len(ordered) - len(self.plans)
        return ordered

    def skip_reason(self, plan: QuantPlan) -> str | None:
        """Why this proposal is not worth a trial, or None to run it."""
        if self.table is None or self.budget is None:
            return None
        t = self.table
        choices = {n: Format(c.format) for n, c in plan.resolve(t.layers).items() if Format(c.format) is not Format.FP32}
        # A cell the table never measured (a format the backend only emulates there, e.g. int4 on a Conv) is
        # unknown, not hopeless: it adds nothing, and the sum is a lower bound of the additive prediction.
        measured = {n: f for n, f in choices.items() if t.cell(n, f) is not None}
        failed = sorted(f"{n}={f.value}" for n, f in measured.items() if not math.isfinite(t.drop(n, f)))
        if failed:
            return (f"skipped: the single-layer candidate of {', '.join(failed[:3])}"
                    f"{' ...' if len(failed) > 3 else ''} failed in the sensitivity table ({t.eval_label})")
        drop = float(sum(max(t.drop(n, f), 0.0) for n, f in measured.items()))
        if drop > SKIP_MARGIN * self.budget:
            unknown = len(choices) - len(measured)
            return (f"skipped: predicted {t.metric} drop {drop:.4f} (sum of single-layer drops, {t.eval_label}"
                    + (f"; {unknown} layer choice(s) not in the table counted as 0" if unknown else "")
                    + f") exceeds {SKIP_MARGIN:g} x search.max_accuracy_drop {self.budget}")
        return None


def backend_emulated(config: SearchConfig, table: LayerTable) -> dict[str, set[Format]]:
    """Per layer, the searched formats the configured backend only emulates.

    Asks the backend object when it resolves here; where it does not (a GPU backend seen from a
    CPU-only driver) the static table by backend name stands, with FP8 counted as emulated (its
    native kernels depend on the GPU, which the driver cannot see).
    """
    from pipeline.backends import native

    spec = config.search
    try:
        from pipeline.backends import resolve_backend

        backend, _ = resolve_backend(config.measure.backend)
    except Exception as exc:  # noqa: BLE001 - fall back to the static table by name
        from types import SimpleNamespace

        from pipeline.backends import quant_target_for

        log.info("backend %s not resolvable here (%s); using the static native table", config.measure.backend, exc)
        name = config.measure.backend
        backend = SimpleNamespace(name=name, quant_target=quant_target_for(name),
                                  execution=lambda fmt, realisation="": native.execution(name, fmt, realisation))
    return emulated_formats(backend, table, spec.formats, spec.int8_activations)


TABLE_SHARE = 1 / 3
"""With ``seed: auto`` and ``search --time-budget``, the table may use at most this share of the
budget (and is charged to it): the rest is the search's. A table that does not finish in its share
is kept (cached cell by cell) and the search runs unseeded; the next run goes on measuring it."""


@dataclass(frozen=True)
class TableScope:
    """The layers and formats the search's sensitivity table covers (also ``make sensitivity``'s default,
    so the table it caches is the one a search reads)."""

    layers: list[str]
    formats: list[Format]
    left_out: list[Format]  # searched formats the backend only emulates on every searched layer
    skip: dict[str, set[Format]] = field(default_factory=dict)  # per layer: kept formats it only emulates
    grouping: str = "layer"  # search.group_layers as resolved for these layers
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> layers (empty when per layer)

    @property
    def cells(self) -> int:
        """Candidates the table needs: one per layer (or per group, when the search groups) and format, but
        none for a format every member only emulates (the search never proposes it there)."""
        units = self.groups or {n: [n] for n in self.layers}
        return sum(1 for members in units.values() for f in self.formats
                   if not all(f in self.skip.get(m, set()) for m in members))

    @property
    def unit(self) -> str:
        return "single-layer candidates" if not self.groups else f"candidates, one per {self.grouping} group x format"


def table_scope(config: SearchConfig, table: LayerTable, emulated: dict[str, set[Format]] | None = None) -> TableScope:
    """Searched layers (not pinned, not excluded) x searched formats other than FP32 that the backend
    runs natively on at least one of them (all of them with ``search.include_emulated``): a cell for a
    format the search leaves out would be measured for nothing."""
    from search_spaces.space import SearchSpace

    spec = config.search
    emulated = backend_emulated(config, table) if emulated is None else emulated
    fixed = SearchSpace.build(spec, table.names)
    layers = [n for n in table.names if n not in fixed.pinned and n not in fixed.excluded]
    fmts = [f for f in spec.formats if f is not Format.FP32]
    keep = [f for f in fmts if spec.include_emulated or any(f not in emulated.get(n, set()) for n in layers)]
    from search_spaces.pruning import group_key, group_mode

    # A grouped search decides one format per group, so the table measures what it decides: each group in each
    # format as one candidate (interactions inside the group included, and 4x fewer candidates on MiniLM).
    mode = group_mode(spec, layers)
    groups: dict[str, list[str]] = {}
    if mode != "layer":
        for n in layers:
            groups.setdefault(group_key(n, mode), []).append(n)
        if all(len(m) == 1 for m in groups.values()):
            groups = {}
    skip = {} if spec.include_emulated else {n: {f for f in keep if f in emulated.get(n, set())} for n in layers}
    return TableScope(layers=layers, formats=keep, left_out=[f for f in fmts if f not in keep],
                      grouping=mode if groups else "layer", groups=groups, skip={n: s for n, s in skip.items() if s})


@dataclass(frozen=True)
class SeedDecision:
    """Whether (and how long) the search measures its sensitivity table, and the line that says why."""

    measure: bool
    deadline_s: float | None  # seconds the table may take (auto with a time budget), else no limit
    reason: str


def seed_decision(seed: bool | str, cells: int, trials: int, time_budget_s: float | None,
                  unit: str = "single-layer candidates") -> SeedDecision:
    """The ``search.sensitivity.seed`` rule for a table that is not cached (a cached one is always used).

    ``auto`` measures it when it needs no more single-layer candidates than the search has trials
    (each cell is an accuracy-only candidate on an eval subset, cheaper than a trial), or, under a time
    budget, for at most :data:`TABLE_SHARE` of it. Why not always: on a model with many layers the
    table can cost more than the whole search (all-MiniLM-L6-v2 searched per layer: 39 layers x
    {int8, int4} = 78 candidates against 30 trials), and a search that spends its budget before its
    first trial helps no one; ``make sensitivity`` once (cached) makes every later search seeded. A
    grouped search's table has one candidate per group (MiniLM by role: 21, measured).
    """
    if seed is False:
        return SeedDecision(False, None, "sensitivity seeding off (search.sensitivity.seed: false)")
    if seed is True:
        return SeedDecision(True, None, f"measuring the sensitivity table ({cells} {unit}, "
                                        "search.sensitivity.seed: true)")
    if time_budget_s:
        share = TABLE_SHARE * time_budget_s
        return SeedDecision(True, share, f"measuring the sensitivity table ({cells} {unit}) for at "
                                         f"most {share / 60:.1f} min of the time budget (search.sensitivity.seed: auto)")
    if cells <= trials:
        return SeedDecision(True, None, f"measuring the sensitivity table ({cells} {unit}, no more "
                                        f"than the {trials} trials; search.sensitivity.seed: auto)")
    return SeedDecision(False, None, (
        f"not seeded: the sensitivity table needs {cells} {unit}, more than the {trials} trials "
        "asked for; `make sensitivity` (or `precision-search sensitivity`) measures it once, cached, and every "
        "later search uses it; or set search.sensitivity.seed: true, or give --time-budget"))


def seeding_for(config: SearchConfig, evaluator=None, *, layer_table: LayerTable | None = None,
                progress=None, trials: int | None = None, time_budget_s: float | None = None,
                say=None, units_runner_for=None) -> Seeding:
    """Everything sensitivity gives the runner; what is measured follows :func:`seed_decision`.

    ``evaluator``: the runner's Evaluator, if it has one (its workdir and reference are reused;
    the single-layer candidates get their own eval-subset Evaluator); ``layer_table``: the
    reference's table when the caller holds it already (no second export); ``trials`` /
    ``time_budget_s``: the search's (``seed: auto`` weighs the table's cost against them);
    ``say``: where the one-line decision goes (default: the log); ``units_runner_for(subset_config,
    subset_evaluator)``: called only when the table is to be measured, returns how its candidates run
    (the search's Ray workers; None or absent: one by one here)."""
    import time

    from pipeline.sensitivity.measure import TableIncomplete

    say = say or log.info
    table = layer_table or (evaluator.reference.layer_table if evaluator is not None
                            else reference_for(config).layer_table)
    emulated = backend_emulated(config, table)
    spec = config.search
    if spec.sensitivity.seed is False:
        return Seeding(table=None, emulated=emulated)
    scope = table_scope(config, table, emulated)
    if not scope.cells:
        return Seeding(table=None, emulated=emulated)
    sub = subset_config(config, spec.sensitivity.eval_limit)
    from pipeline.sensitivity.measure import evaluator_class

    # One subset Evaluator for the cache lookup and the measurement (data loaded once).
    sub_ev = evaluator_class()(sub, workdir=evaluator.workdir) if evaluator is not None else evaluator_class()(sub)
    kwargs = dict(formats=scope.formats, layers=scope.layers, evaluator=sub_ev, groups=scope.groups or None,
                  grouping=scope.grouping, skip=scope.skip or None)
    sens = build_sensitivity(config, cached_only=True, **kwargs)
    charged = 0.0
    if sens is None:
        decision = seed_decision(spec.sensitivity.seed, scope.cells, trials or spec.trials, time_budget_s, scope.unit)
        say(decision.reason)
        if not decision.measure:
            return Seeding(table=None, emulated=emulated, note=decision.reason)
        t0 = time.monotonic()
        runner = units_runner_for(sub, sub_ev) if units_runner_for is not None else None
        try:
            sens = build_sensitivity(config, progress=progress, units_runner=runner, deadline=(
                t0 + decision.deadline_s if decision.deadline_s is not None else None), **kwargs)
        except TableIncomplete as exc:
            charged = time.monotonic() - t0
            note = (f"not seeded: the sensitivity table did not fit its share of the time budget ({exc}); the "
                    "measured cells are cached and the next search (or `make sensitivity`) goes on from there")
            say(note)
            return Seeding(table=None, emulated=emulated, note=note, charged_s=charged)
        if decision.deadline_s is not None:
            charged = time.monotonic() - t0
    else:
        say(f"sensitivity table from the cache ({len(sens.cells)} cells, {sens.eval_label})")
    return _seeding_from(config, sens, table, emulated, charged)


def _seeding_from(config: SearchConfig, sens: SensitivityTable, table: LayerTable,
                  emulated: dict[str, set[Format]], charged: float) -> Seeding:
    spec = config.search
    from search_spaces.pruning import dominated_emulated

    # The search space's own rule (an emulated format stays where it is the only way to a smaller layer); such a
    # format has no table cell (table_scope does not measure emulated cells), so the pruning keeps it unjudged
    # and the solver, which needs a measured drop, never seeds it: the sampler may still try it.
    allowed_base = {n: [f for f in spec.formats if spec.include_emulated
                        or f not in dominated_emulated(spec.formats, emulated.get(n, set()))]
                    for n in table.names}
    allowed = prune_formats(sens, spec.max_accuracy_drop, allowed=allowed_base)
    if Format.FP32 not in spec.formats:  # prune_formats keeps fp32 as the safe choice; the user ruled it out
        allowed = {n: [f for f in fs if f is not Format.FP32] or fs for n, fs in allowed.items()}
    from search_spaces.space import SearchSpace

    fixed = SearchSpace.build(spec, table.names)  # pins and excludes: the solver plans around them
    for n, f in fixed.pinned.items():
        allowed[n] = [f]
    for n in fixed.excluded:
        allowed[n] = [Format.FP32]
    from search_spaces.pruning import group_key, group_mode

    mode = group_mode(spec, [n for n in sens.layers if n not in fixed.pinned and n not in fixed.excluded])
    groups: dict[str, list[str]] = {}
    for n in sens.layers:
        groups.setdefault(group_key(n, mode), []).append(n)
    knobs = plan_knobs(config)
    plans = seed_plans(sens, spec.sensitivity.bits_budgets, max_drop=spec.max_accuracy_drop, groups=groups,
                       allowed=allowed, greedy=spec.sensitivity.greedy_plans, knobs=knobs)
    # The table covers the searched layers only: every seed also names the pinned and excluded ones.
    held = {glob.escape(n): f for n, f in fixed.pinned.items()} | {glob.escape(n): Format.FP32 for n in fixed.excluded}
    return Seeding(table=sens, plans=[_with_held(p, held) for p in plans], allowed=allowed, emulated=emulated,
                   budget=spec.max_accuracy_drop, charged_s=charged, groups=groups, knobs=knobs, held=held,
                   latency_budgets=list(spec.sensitivity.latency_budgets))


def _with_held(plan: QuantPlan, held: dict[str, Format]) -> QuantPlan:
    """``plan`` also naming the pinned and excluded layers (the table and the solver leave them out)."""
    if not held:
        return plan
    data = plan.model_dump()
    return QuantPlan.model_validate({**data, "layers": {**data["layers"], **held}})


def sensitivity_seeds(config: SearchConfig, evaluator=None) -> list[QuantPlan]:
    """The solver's and the greedy sequence's plans for this config ([] when it runs unseeded)."""
    return seeding_for(config, evaluator).plans


def space_inputs(config: SearchConfig, table: LayerTable, seeding: Seeding | None = None) -> dict:
    """Keyword arguments for ``SearchSpace.build``: ``emulated`` and, when seeded, ``allowed``."""
    emulated = seeding.emulated if seeding else backend_emulated(config, table)
    out: dict = {"emulated": emulated}
    if seeding and seeding.allowed is not None:
        out["allowed"] = seeding.allowed
    return out


def reference_for(config: SearchConfig):
    from pipeline.models import get_adapter

    return get_adapter(config).export_reference(config.work_path)
