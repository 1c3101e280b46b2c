"""Build the sensitivity table: every layer x format as a single-layer candidate, on the artifact.

Each cell is a real candidate - one layer in the format, every other layer FP32 - quantized by
the product's quantizer and run through the backend's runtime by the :class:`Evaluator`, exactly
like a search trial, but on an eval subset (``search.sensitivity.eval_limit``, labelled in the
table) and without timing or energy (neither is read). The cheap proxy (:mod:`.proxy`) is
computed for every cell beside it and its rank correlation with the artifact reported.

``mode="proxy"`` measures only ``check_layers`` layers on the artifact, fits one scale per format
(drop ~ a x proxy, least squares on those layers) and fills the other layers' drops from the
proxy: the table's ``source`` then says ``proxy`` and the check says how far to trust it.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from pipeline.config import SearchConfig
from pipeline.formats import Format
from pipeline.plan import QuantPlan
from pipeline.sensitivity.cache import SensitivityCache, cache_key, data_digest, file_digest
from pipeline.sensitivity.costs import layer_costs
from pipeline.sensitivity.probe import probe_reference
from pipeline.sensitivity.proxy import PROXY_DESCRIPTION, proxy_score, rank_correlation
from pipeline.sensitivity.table import Cell, ProxyCheck, SensitivityTable

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, what was just measured)


def evaluator_class():
    """The Evaluator, wherever the evaluation package keeps it (it is being moved)."""
    try:
        from pipeline.evaluation.evaluator import Evaluator
    except ImportError:
        from pipeline.evaluate import Evaluator
    return Evaluator


def subset_config(config: SearchConfig, eval_limit: int | None) -> SearchConfig:
    """The config whose eval set is the first ``eval_limit`` rows (the user's own limit if smaller),
    with the shortest timing loop: single-layer candidates are measured for accuracy only."""
    cfg = config.model_copy(deep=True)
    cfg.base_dir = config.base_dir
    if eval_limit:
        cfg.data.eval.limit = min(eval_limit, cfg.data.eval.limit or eval_limit)
    cfg.measure.runs, cfg.measure.warmup = 1, 0
    return cfg


def plan_knobs(config: SearchConfig) -> dict:
    """The single-layer candidates' knobs: each first choice of the search section."""
    s = config.search
    return {"int8_activations": s.int8_activations[0], "calibration": s.calibrations[0],
            "int4_block_size": s.int4_block_sizes[0]}


def single_layer_plan(layer: str, fmt: Format, knobs: dict) -> QuantPlan:
    return QuantPlan(layers={glob.escape(layer): Format(fmt)}, **knobs)


def build_sensitivity(config: SearchConfig, *, formats: list[Format] | None = None, eval_limit: int | None = -1,
                      layers: list[str] | None = None, mode: Literal["artifact", "proxy"] = "artifact",
                      check_layers: int = 4, cache_dir: str | Path | None = None, use_cache: bool = True,
                      evaluator=None, progress: Progress | None = None, deadline: float | None = None,
                      cached_only: bool = False, groups: dict[str, list[str]] | None = None,
                      grouping: str = "layer", skip: dict[str, set[Format]] | None = None,
                      units_runner: UnitsRunner | None = None) -> SensitivityTable | None:
    """Measure (or read from the cache) the sensitivity table of ``config``'s model.

    ``eval_limit=-1`` takes ``search.sensitivity.eval_limit``; None uses every eval row.
    ``evaluator``: an Evaluator already built for :func:`subset_config` (tests, the runner).
    ``cached_only``: return the cached table or None, measure nothing. ``deadline`` (a
    ``time.monotonic()`` value): stop measuring once it passes and raise :class:`TableIncomplete`;
    the cells measured so far stay in the cache, so the next call goes on from there. ``groups``
    (name -> layers, ``grouping`` naming the rule): measure each group in each format as one
    candidate, as a grouped search decides it (:attr:`Cell.group`); artifact mode only. ``skip``
    (layer -> formats): cells not to measure - a unit is skipped in a format when every member lists
    it (the search's formats the backend only emulates there: the search never proposes them).
    ``units_runner``: how the candidates not in the cache are measured (default :func:`serial_units`,
    here one by one; the search passes Ray tasks over its workers when it runs several at once).
    """
    start = time.perf_counter()
    if eval_limit == -1:
        eval_limit = config.search.sensitivity.eval_limit
    cfg = subset_config(config, eval_limit)
    ev = evaluator or evaluator_class()(cfg)
    fmts = [Format(f) for f in (formats or config.search.formats) if Format(f) is not Format.FP32]
    if not fmts:
        from pipeline.config import ConfigError

        raise ConfigError("search.formats: sensitivity needs at least one format besides fp32, e.g. [int8, int4]")
    table = ev.reference.layer_table
    names = list(layers or table.names)
    unknown = [n for n in names if n not in table.names]
    if unknown:
        from pipeline.config import ConfigError

        raise ConfigError(f"--layers: {unknown} are not quantizable layers (see `precision-search layers`)")
    knobs = plan_knobs(config)
    knobs_text = (f"int8 activations {knobs['int8_activations']}, calibration {knobs['calibration']}, "
                  f"int4 block {knobs['int4_block_size']}")
    eval_set = ev.eval_set
    units = _units(names, groups if mode == "artifact" else None)
    grouped = any(len(members) > 1 for _, members in units)
    key_mode = f"{mode}:{check_layers}" if mode == "proxy" else mode
    if grouped:
        key_mode += ":groups=" + json.dumps(units)
    skipped = sorted((u, f.value) for u, members in units for f in fmts
                     if skip and all(f in skip.get(m, set()) for m in members))
    if skipped:
        key_mode += ":skip=" + json.dumps(skipped)
    key = cache_key(reference=file_digest(ev.reference.onnx_path), data=data_digest(eval_set.inputs, eval_set.targets),
                    metric=config.metric.model_dump_json(), backend=ev.backend.name,
                    formats=[f.value for f in fmts], knobs=knobs_text, layers=names, mode=key_mode)
    cache = SensitivityCache(Path(cache_dir) if cache_dir else Path(cfg.work_path) / "sensitivity", key)
    if use_cache and (hit := cache.load()) is not None:
        return hit
    if cached_only:
        return None

    ref_acc = ev.reference_accuracy
    feeds = ev.calibration_feeds()
    try:
        probe = probe_reference(ev.reference.onnx_path, table, feeds)
    except Exception as exc:  # noqa: BLE001 - the probe only refines estimates; the artifact cells stand
        log.warning("probe run of the reference failed (%s); latency share falls back to parameters", exc)
        probe = None
    costs, latency_label = layer_costs(table, probe)
    costs = [c for c in costs if c.layer in names]

    scores = _proxy_scores(ev, table, names, fmts, probe, knobs["int4_block_size"], knobs["int8_activations"])
    measured_layers = names if mode == "artifact" else _spread(names, scores, check_layers)
    if mode != "artifact":
        units = [(n, [n]) for n in measured_layers]
    done = cache.done_cells() if use_cache else {}
    todo = [(u, f) for u in units for f in fmts if (u[0], f.value) not in set(skipped)]
    total = len(todo)
    results: dict[int, list[Cell]] = {}
    jobs: list[UnitJob] = []
    for i, ((unit, members), fmt) in enumerate(todo):
        have = [done.get((m, fmt.value)) for m in members]
        if all(have):
            results[i] = have
        else:
            jobs.append(UnitJob(i, unit, members, fmt))

    reported = 0

    def report(job: UnitJob, cells: list[Cell]) -> None:
        nonlocal reported
        reported += 1
        if progress:
            c = cells[0]
            progress(reported, total, f"{job.unit} {job.fmt.value}: " + (
                f"drop {c.decisive_drop:+.4f}" if c.drop is not None else f"failed ({c.error})"))

    for i in sorted(results):  # from the cache
        report(UnitJob(i, todo[i][0][0], todo[i][0][1], todo[i][1]), results[i])
    with tempfile.TemporaryDirectory(dir=cfg.work_path) as tmp:
        run = units_runner or serial_units(ev, Path(tmp))
        for job, new in run(jobs, knobs, deadline):
            for cell in new:
                cache.append(cell)
            results[job.index] = new
            report(job, new)
    if len(results) < total:
        raise TableIncomplete(done=len(results), total=total, seconds=time.perf_counter() - start)
    cells: list[Cell] = [c for i in range(total) for c in results[i]]
    pairs = [(scores[c.layer][c.format.value], c.drop) for c in cells if c.drop is not None]
    check = ProxyCheck(proxy=PROXY_DESCRIPTION, layers=measured_layers, spearman=rank_correlation(pairs),
                       cells=len(pairs), scores=scores)
    if mode == "proxy":
        cells += _fill_from_proxy(names, measured_layers, fmts, cells, scores)
    n = len(eval_set)
    label = (f"eval subset: first {n} rows of data.eval (sensitivity.eval_limit={eval_limit})"
             if eval_limit and n >= eval_limit else f"all {n} rows of data.eval")
    result = SensitivityTable(
        model=config.name, backend=ev.backend.name, device=ev.backend.device(), metric=config.metric.name,
        higher_is_better=bool(config.metric.higher_is_better), reference_accuracy=ref_acc, eval_rows=n,
        eval_label=label, formats=fmts, plan_defaults=knobs_text, source=mode, latency_source=latency_label,
        grouping=grouping if grouped else "layer",
        cells=cells, costs=costs, proxy=check, cache_key=key, seconds=round(time.perf_counter() - start, 2),
    )
    cache.save(result)
    return result


class UnitJob(NamedTuple):
    """One candidate of the table: ``unit`` (a layer, or a group of ``members``) quantized to ``fmt``."""

    index: int
    unit: str
    members: list[str]
    fmt: Format


UnitsRunner = Callable[[list[UnitJob], dict, "float | None"], Iterator[tuple[UnitJob, list[Cell]]]]
"""Measures jobs and yields ``(job, cells)`` as each finishes, in any order; stops starting new ones once
the ``time.monotonic()`` deadline (if any) has passed. :func:`serial_units` runs them here, one by one;
:class:`pipeline.search.table_tasks.RayUnits` runs them as Ray tasks over the cluster's workers."""


def serial_units(ev, tmp: Path) -> UnitsRunner:
    """Each candidate in this process, in order (``make sensitivity``, and a search that runs one trial at a time)."""
    def run(jobs: list[UnitJob], knobs: dict, deadline: float | None):
        for job in jobs:
            if deadline is not None and time.monotonic() > deadline:
                return
            yield job, measure_unit(ev, job.unit, job.members, job.fmt, knobs, tmp / f"c{job.index}")
    return run


def measure_unit(ev, unit: str, members: list[str], fmt: Format, knobs: dict, out_dir: Path) -> list[Cell]:
    """One candidate: a single layer's cell, or a group's cells (each member holding an even share)."""
    if len(members) == 1:
        return [_measure_cell(ev, members[0], fmt, knobs, out_dir)]
    return _measure_group(ev, unit, members, fmt, knobs, out_dir)


class TableIncomplete(Exception):
    """The table's time ran out (``deadline``); its measured cells are cached for the next call."""

    def __init__(self, done: int, total: int, seconds: float):
        super().__init__(f"{done} of {total} candidates measured in {seconds:.0f} s")
        self.done, self.total, self.seconds = done, total, seconds


def _measure_cell(ev, layer: str, fmt: Format, knobs: dict, out_dir: Path) -> Cell:
    start = time.perf_counter()
    try:
        result = ev.evaluate(single_layer_plan(layer, fmt, knobs), out_dir, energy=False)
    except Exception as exc:  # noqa: BLE001 - a format this backend cannot build for this layer is a finding
        return Cell(layer=layer, format=fmt, error=f"{type(exc).__name__}: {exc}"[:300],
                    seconds=round(time.perf_counter() - start, 3))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    m = result.measurement
    execution = next((lr.execution for lr in result.layers if lr.name == layer), None)
    return Cell(layer=layer, format=fmt, accuracy=m.accuracy, drop=m.accuracy_drop, execution=execution,
                seconds=round(time.perf_counter() - start, 3))


def _units(names: list[str], groups: dict[str, list[str]] | None) -> list[tuple[str, list[str]]]:
    """What one candidate quantizes: each layer alone, or each group (its members among ``names``)."""
    if not groups:
        return [(n, [n]) for n in names]
    wanted, out, placed = set(names), [], set()
    for g, members in groups.items():
        ms = [m for m in members if m in wanted]
        if ms:
            out.append((g, ms))
            placed.update(ms)
    return out + [(n, [n]) for n in names if n not in placed]


def _measure_group(ev, group: str, members: list[str], fmt: Format, knobs: dict, out_dir: Path) -> list[Cell]:
    """Every member in ``fmt`` at once (one candidate); each member's cell holds an even share of the drop."""
    start = time.perf_counter()
    plan = QuantPlan(layers={glob.escape(m): Format(fmt) for m in members}, **knobs)
    try:
        result = ev.evaluate(plan, out_dir, energy=False)
    except Exception as exc:  # noqa: BLE001 - as for a single layer: a finding, not a crash
        err = f"{type(exc).__name__}: {exc}"[:300]
        secs = round(time.perf_counter() - start, 3)
        return [Cell(layer=m, format=fmt, error=err, seconds=secs, group=group) for m in members]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    m = result.measurement
    execution = {lr.name: lr.execution for lr in result.layers}
    secs = round(time.perf_counter() - start, 3)
    share = None if m.accuracy_drop is None else m.accuracy_drop / len(members)
    return [Cell(layer=n, format=fmt, accuracy=m.accuracy, drop=share, execution=execution.get(n), seconds=secs,
                 group=group, group_drop=m.accuracy_drop) for n in members]


def _proxy_scores(ev, table, names, fmts, probe, block: int, int8_activations) -> dict[str, dict[str, float]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ev.reference.onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, dict[str, float]] = {}
    for n in names:
        layer = table[n]
        if layer.weight not in inits:
            continue
        w = numpy_helper.to_array(inits[layer.weight])
        p = probe.layers.get(n) if probe else None
        out[n] = {f.value: proxy_score(w, layer, p, f, block, str(int8_activations)) for f in fmts}
    return out


def _spread(names: list[str], scores: dict[str, dict[str, float]], k: int) -> list[str]:
    """``k`` layers spread over the proxy's range (lowest, highest and between), so the check
    covers the scale the fit extrapolates over."""
    ranked = sorted(names, key=lambda n: sum(scores.get(n, {}).values()))
    if len(ranked) <= k:
        return ranked
    idx = sorted({round(i * (len(ranked) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(ranked) - 1]
    return [ranked[i] for i in idx]


def _fill_from_proxy(names, measured, fmts, cells, scores) -> list[Cell]:
    """Drops of the unmeasured layers: drop ~ a_f x proxy, a_f fitted on the measured cells."""
    out = []
    for f in fmts:
        xs = np.array([scores[c.layer][f.value] for c in cells if c.format is f and c.drop is not None])
        ys = np.array([max(c.drop, 0.0) for c in cells if c.format is f and c.drop is not None])
        a = float((xs * ys).sum() / (xs * xs).sum()) if xs.size and (xs * xs).sum() > 0 else 0.0
        for n in names:
            if n not in measured and n in scores:
                out.append(Cell(layer=n, format=f, drop=a * scores[n][f.value], execution=None,
                                error=None))
    return out
