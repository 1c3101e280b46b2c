"""What the search runner takes from sensitivity: seeds, per-layer formats, and a skip rule.

The runner (``pipeline.search.runner.StudyRunner``) calls, once at setup:

* :func:`space_inputs` -> ``emulated``/``allowed`` for ``SearchSpace.build`` (emulated formats are
  left out by default; pruned formats only when ``search.sensitivity.seed`` is on);
* :func:`sensitivity_seeds` -> plans to enqueue next to the uniform baselines;

and per proposal :meth:`Seeding.skip_reason` -> a reason to tell Optuna the trial is PRUNED
instead of dispatching it (its predicted drop already exceeds ``search.max_accuracy_drop``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.config import SearchConfig
from pipeline.formats import Format
from pipeline.layers import LayerTable
from pipeline.plan import QuantPlan
from pipeline.sensitivity.emulation import emulated_formats
from pipeline.sensitivity.measure import build_sensitivity, plan_knobs, subset_config
from pipeline.sensitivity.solver import prune_formats, seed_plans
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

    def skip_reason(self, plan: QuantPlan) -> str | None:
        """Why this proposal is not worth a trial, or None to run it."""
        if self.table is None or self.budget is None:
            return None
        drop = self.table.predicted_drop(plan)
        if drop > SKIP_MARGIN * self.budget:
            return (f"skipped: predicted {self.table.metric} drop {drop:.4f} (sum of single-layer drops, "
                    f"{self.table.eval_label}) exceeds {SKIP_MARGIN:g} x search.max_accuracy_drop {self.budget}")
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


def seeding_for(config: SearchConfig, evaluator=None, *, layer_table: LayerTable | None = None,
                progress=None) -> Seeding:
    """Everything sensitivity gives the runner; no measurement unless ``search.sensitivity.seed``.

    ``evaluator``: the runner's Evaluator, if it has one (its workdir and reference are reused;
    the single-layer candidates get their own eval-subset Evaluator); ``layer_table``: the
    reference's table when the caller holds it already (no second export)."""
    table = layer_table or (evaluator.reference.layer_table if evaluator is not None
                            else _reference(config).layer_table)
    emulated = backend_emulated(config, table)
    spec = config.search
    if not spec.sensitivity.seed:
        return Seeding(table=None, emulated=emulated)
    sub = subset_config(config, spec.sensitivity.eval_limit)
    from pipeline.sensitivity.measure import evaluator_class

    sub_ev = evaluator_class()(sub, workdir=evaluator.workdir) if evaluator is not None else None
    sens = build_sensitivity(config, evaluator=sub_ev, progress=progress)
    allowed_base = {n: [f for f in spec.formats if spec.include_emulated or f not in emulated.get(n, set())]
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
    plans = seed_plans(sens, spec.sensitivity.bits_budgets, max_drop=spec.max_accuracy_drop, groups=groups,
                       allowed=allowed, greedy=spec.sensitivity.greedy_plans, knobs=plan_knobs(config))
    return Seeding(table=sens, plans=plans, allowed=allowed, emulated=emulated, budget=spec.max_accuracy_drop)


def sensitivity_seeds(config: SearchConfig, evaluator=None) -> list[QuantPlan]:
    """The solver's and the greedy sequence's plans for this config ([] unless ``search.sensitivity.seed``)."""
    return seeding_for(config, evaluator).plans


def space_inputs(config: SearchConfig, table: LayerTable, seeding: Seeding | None = None) -> dict:
    """Keyword arguments for ``SearchSpace.build``: ``emulated`` and, when seeded, ``allowed``."""
    emulated = seeding.emulated if seeding else backend_emulated(config, table)
    out: dict = {"emulated": emulated}
    if seeding and seeding.allowed is not None:
        out["allowed"] = seeding.allowed
    return out


def _reference(config: SearchConfig):
    from pipeline.models import get_adapter

    return get_adapter(config).export_reference(config.work_path)
