"""Search quality: hypervolume after N trials, sensitivity-seeded search vs Optuna baselines.

Strategies, each given the same trial budget and the same seeds:

* ``seeded``: the product's search - uniform baselines, emulated formats left out, per-layer formats pruned by the
  sensitivity table, the solver's, the speed-aware and the greedy plans enqueued after the baselines (the
  speed-aware ones weigh formats by the baselines' measured latency), then TPE; proposals whose
  predicted drop cannot meet the budget are told to Optuna as PRUNED (they use a trial of the
  budget but no measurement);
* ``tpe``: plain TPE (multivariate, grouped, as ``search.sampler: tpe``) over the full space;
* ``random``: Optuna's RandomSampler over the full space;
* ``uniform``: the uniform baselines only (one plan per format), the simple-baseline front.

Every plan is measured with the product's Evaluator (artifact through ONNX Runtime, accuracy on
the eval set, file size); identical resolved plans are measured once and shared by all
strategies, so they see the same numbers. In-search latency steers the samplers; the score uses
latency re-timed after all searches, every feasible plan and FP32 interleaved over several rounds
(median), so load on a shared machine does not pick the winner. Hypervolume is over (accuracy, latency, size) of
the feasible plans (drop <= search.max_accuracy_drop), with the reference point = the FP32 point
at the accuracy budget (accuracy - budget, FP32 latency, FP32 size), normalised by FP32 latency and
size. The sensitivity table's one-off cost (cached afterwards) is printed beside the table.

Run: ``.venv/bin/python benchmarks/search_quality.py --trials 20 --seeds 0 1 2`` (digits CNN, a few
minutes on 2 cores); ``--minilm`` for MiniLM on STS-B dev (hours on 2 cores: use --eval-limit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("seeded", "tpe", "random", "uniform")


def _config(args):
    from pipeline.config import load_config

    preset = "minilm_stsb.yaml" if args.minilm else "digits_cnn.yaml"
    overrides = {"workdir": args.workdir, "measure.runs": args.runs, "measure.warmup": 2,
                 "search.sensitivity.eval_limit": args.eval_limit}
    if args.eval_rows:
        overrides["data.eval.limit"] = args.eval_rows
    return load_config(ROOT / "search_spaces" / preset, overrides=overrides)


class Measured:
    """Evaluator results by resolved plan, shared across strategies."""

    def __init__(self, config, workdir: Path):
        from pipeline.sensitivity.measure import evaluator_class

        self.ev = evaluator_class()(config)
        self.names = self.ev.reference.layer_table.names
        self.work = workdir
        self.cache: dict[str, tuple[float, float, float] | None] = {}
        self.artifacts: dict[str, str] = {}
        self.cost: dict[str, float] = {}  # seconds the first measurement of each plan took
        self.seconds = 0.0

    @staticmethod
    def key(plan, names) -> str:
        r = plan.resolve(names)
        parts = []
        for n, c in r.items():
            tag = c.format.value
            if tag == "int8":
                tag += f"/{c.int8_activations.value}/{plan.calibration.value if c.int8_activations.value == 'static' else ''}"
            elif tag == "int4":
                tag += f"/{c.int4_block_size}"
            elif tag == "fp8":
                tag += f"/{plan.calibration.value}"
            parts.append(tag)
        return plan.method + "|" + ",".join(parts)

    def __call__(self, plan):
        k = self.key(plan, self.names)
        if k not in self.cache:
            start = time.perf_counter()
            try:
                result = self.ev.evaluate(plan, self.work / f"p{len(self.cache)}", energy=False)
                m = result.measurement
                self.cache[k] = (m.accuracy, m.latency_ms_p50, float(m.size_bytes))
                self.artifacts[k] = result.artifact_path
            except Exception as exc:  # noqa: BLE001 - a failed plan is a failed trial for every strategy
                print(f"  plan failed: {type(exc).__name__}: {exc}"[:200])
                self.cache[k] = None
            self.cost[k] = time.perf_counter() - start
            self.seconds += self.cost[k]
        return self.cache[k]

    def remeasure(self, keys: list[str], rounds: int, runs: int) -> dict[str, float]:
        """p50 latency per plan, re-timed interleaved: every round times every artifact once (in a
        new order each round), so load on a shared machine hits all plans alike; median of rounds."""
        import random

        import numpy as np

        from pipeline.measure import settle, time_batches

        cfg = self.ev.config
        feeds = self.ev.eval_set.fixed_batch(cfg.measure.batch_size)
        sessions = {k: self.ev.backend.open(self.artifacts[k], cfg.measure.threads) for k in keys}
        samples: dict[str, list[float]] = {k: [] for k in keys}
        order = list(keys)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                settle()  # the previous plan's ORT threads stop spinning first
                samples[k].append(float(np.median(time_batches(sessions[k], feeds, 1, runs))))
        return {k: float(np.median(v)) for k, v in samples.items()}


def run_strategy(name: str, seed: int, config, measured: Measured, seeding, n_trials: int) -> dict:
    import optuna

    from pipeline.plan import QuantPlan
    from pipeline.sensitivity import space_inputs
    from search_spaces.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = measured.names
    keys, skipped = [], 0
    trace: list[tuple[int, str | None]] = []  # (trial index, plan key or None when pruned/failed), in order
    if name == "uniform":  # the product's own uniform baselines: each format, INT8 in each activation mode
        space = SearchSpace.build(config.search, names)
        baselines = space.uniform_baselines()
        for i, params in enumerate(baselines.values()):
            plan = space.plan_from_params(params)
            k = measured.key(plan, names) if measured(plan) else None
            trace.append((i, k))
            if k:
                keys.append(k)
        return {"keys": keys, "trace": trace, "trials": len(baselines), "skipped": 0}
    kwargs = space_inputs(config, None, seeding) if name == "seeded" else {}
    space = SearchSpace.build(config.search, names, **kwargs)
    if name == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    pending = name == "seeded"  # the product's search: uniform baselines, then the sensitivity seeds
    baselines = space.uniform_baselines() if pending else {}
    for params in baselines.values():
        study.enqueue_trial(params)

    def enqueue_seeds(timings):  # as the runner does: speed-aware plans first, INT8 in the faster baseline's mode
        from pipeline.sensitivity.speed import fastest_int8_mode, format_speed

        source = "the baselines' in-search p50s"
        if config.measure.remeasure_rounds > 0 and len(baseline_keys) > 1:  # as the runner: re-timed interleaved
            from dataclasses import replace

            runs = max(1, config.measure.runs // config.measure.remeasure_rounds)
            again = measured.remeasure(sorted(set(baseline_keys.values())), config.measure.remeasure_rounds, runs)
            timings = [replace(t, latency_ms=again[baseline_keys[t.label]]) for t in timings]
            source = f"baselines re-timed interleaved, {config.measure.remeasure_rounds} rounds"
        mode = fastest_int8_mode(timings) if len(config.search.int8_activations) > 1 else None
        speed = format_speed(timings, source)
        print(f"  {name} seed {seed}: {speed.describe() if speed else 'no speed ratios'}")
        for plan in seeding.ordered_plans(speed):
            try:
                params = space.params_for({n: c.format for n, c in plan.resolve(names).items()},
                                          int8_activations=mode or plan.int8_activations)
            except ValueError as exc:
                print(f"  seed not in the space: {exc}")
                continue
            if params not in list(baselines.values()):  # as the runner: a baseline's plan is not seeded again
                study.enqueue_trial(params)

    timings = []  # the uniform baselines' BaselineTiming, as the runner builds them from its study
    baseline_keys: dict[str, str] = {}  # baseline label -> plan key (its artifact)
    labels = list(baselines)
    floor = (measured(QuantPlan.uniform("fp32")) or (0.0,))[0] - (config.search.max_accuracy_drop or 0.0)
    for i in range(n_trials):
        if pending and i >= len(baselines):
            pending = False
            enqueue_seeds(timings)
        trial = study.ask()
        plan = space.suggest(trial)
        if name == "seeded" and seeding.skip_reason(plan):
            skipped += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            trace.append((i, None))
            continue
        r = measured(plan)
        if r is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            trace.append((i, None))
            continue
        study.tell(trial, list(r))
        if pending and i < len(labels):
            timing = _timing(labels[i], r, floor, config.search.int8_activations)
            if timing is not None:
                timings.append(timing)
                baseline_keys[timing.label] = measured.key(plan, names)
        keys.append(measured.key(plan, names))
        trace.append((i, keys[-1]))
    return {"keys": keys, "trace": trace, "trials": n_trials, "skipped": skipped}


def _timing(label: str, result, floor: float, modes):
    """A uniform baseline's :class:`pipeline.sensitivity.speed.BaselineTiming` (label ``uniform-int8-dynamic``)."""
    from pipeline.sensitivity.speed import BaselineTiming

    return BaselineTiming.from_label(label, result[1], result[0] < floor, modes)


def prefix_after_trials(trace: list[tuple[int, str | None]], n: int) -> list[str]:
    """The plans a strategy had measured within its first ``n`` trials (pruned/failed ones count as trials)."""
    return [k for i, k in trace if i < n and k is not None]


def prefix_after_seconds(trace: list[tuple[int, str | None]], cost: dict[str, float], seconds: float,
                         upfront: float = 0.0) -> list[str]:
    """The plans a strategy had measured within ``seconds`` of measurement time: each trial is charged the
    seconds its plan's first measurement took (a plan it repeats costs nothing, as the product's study
    answers a repeated proposal from the first one);
    ``upfront`` is the one-off cost paid before the first trial (the seeded search's sensitivity table)."""
    spent, out, seen = upfront, [], set()
    for _, k in trace:
        if k is None:
            continue
        if k not in seen:  # a repeat costs nothing: generous to the baselines' samplers
            spent += cost.get(k, 0.0)
            seen.add(k)
        if spent > seconds:
            break
        out.append(k)
    return out


def score(points, ref_acc: float, budget: float, fp32_lat: float, fp32_size: float) -> float:
    from pipeline.pareto import hypervolume

    feasible = [(a, lat / fp32_lat, size / fp32_size) for a, lat, size in points if ref_acc - a <= budget + 1e-12]
    return hypervolume(feasible, ["maximize", "minimize", "minimize"], (ref_acc - budget, 1.0, 1.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minilm", action="store_true", help="MiniLM on STS-B dev instead of the digits CNN")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--eval-limit", type=int, default=512, help="eval rows per single-layer sensitivity candidate")
    ap.add_argument("--eval-rows", type=int, default=None, help="cap the eval rows of every trial (all by default)")
    ap.add_argument("--runs", type=int, default=10, help="timed batches per trial and per re-timing round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved re-timing rounds after the search")
    ap.add_argument("--after-trials", type=int, nargs="*", default=[10, 40],
                    help="also score each strategy after its first N trials (e.g. seeded after 10 vs TPE after 40)")
    ap.add_argument("--after-minutes", type=float, nargs="*", default=[],
                    help="also score each strategy after T minutes of measurement (the seeded search is charged "
                         "its sensitivity table first)")
    ap.add_argument("--workdir", default=str(ROOT / ".precision-search" / "bench-search-quality"))
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from pipeline.plan import QuantPlan
    from pipeline.sensitivity import seeding_for

    config = _config(args)
    config.search.sensitivity.seed = True
    console = Console()
    with tempfile.TemporaryDirectory(dir=Path(args.workdir).parent if Path(args.workdir).parent.exists() else None) as tmp:
        measured = Measured(config, Path(tmp))
        fp32 = measured(QuantPlan.uniform("fp32"))
        start = time.perf_counter()
        seeding = seeding_for(config, measured.ev) if "seeded" in args.strategies else None
        sens_s = time.perf_counter() - start
        ref_acc, budget = fp32[0], config.search.max_accuracy_drop
        console.print(f"{config.name} on {measured.ev.backend.name} ({measured.ev.backend.device()}); FP32 "
                      f"{config.metric.name} {ref_acc:.4f}, in-search p50 {fp32[1]:.3f} ms, {fp32[2] / 1e6:.2f} MB; budget "
                      f"{budget}; {args.trials} trials x seeds {args.seeds}", highlight=False)
        if seeding:
            t = seeding.table
            console.print(f"sensitivity: {len(t.cells)} cells, {t.eval_label}, "
                          f"{'from the cache' if t.from_cache else f'{sens_s:.0f} s (one-off, cached)'}; "
                          f"{len(seeding.plans)} seed plans", highlight=False)
        upfront = 0.0
        if seeding:
            # from the cache: each candidate's seconds once (a group's members all carry their group's)
            per_candidate = {(c.group or c.layer, c.format): c.seconds for c in seeding.table.cells}
            upfront = sum(per_candidate.values()) if seeding.table.from_cache else sens_s
        traces: dict[tuple[str, int], list] = {}
        runs: dict[tuple[str, int], list[str]] = {}
        skipped: dict[str, int] = {s: 0 for s in args.strategies}
        for seed in args.seeds:
            for s in args.strategies:
                out = run_strategy(s, seed, config, measured, seeding, args.trials)
                runs[(s, seed)] = out["keys"]
                traces[(s, seed)] = out["trace"]
                skipped[s] += out["skipped"]
        # Latency of every feasible plan and FP32, re-timed interleaved: the numbers the score uses.
        fp32_key = measured.key(QuantPlan.uniform("fp32"), measured.names)
        feasible = sorted({k for ks in runs.values() for k in ks
                           if measured.cache.get(k) and ref_acc - measured.cache[k][0] <= budget + 1e-12} | {fp32_key})
        console.print(f"re-timing {len(feasible)} feasible plans interleaved ({args.rounds} rounds)", highlight=False)
        latency = measured.remeasure(feasible, args.rounds, args.runs)
        results: dict[str, list[float]] = {s: [] for s in args.strategies}
        for (s, seed), keys in runs.items():
            points = [(measured.cache[k][0], latency[k], measured.cache[k][2]) for k in keys if k in latency]
            results[s].append(score(points, ref_acc, budget, latency[fp32_key], fp32[2]))
            console.print(f"  seed {seed} {s:8s} hypervolume {results[s][-1]:.4f}", highlight=False)
        at: dict[str, dict[str, list[float]]] = {}  # checkpoint label -> strategy -> per-seed hypervolume

        def hv(keys: list[str]) -> float:
            pts = [(measured.cache[k][0], latency[k], measured.cache[k][2]) for k in keys if k in latency]
            return score(pts, ref_acc, budget, latency[fp32_key], fp32[2])

        for (s, seed), trace in traces.items():
            for n in args.after_trials:
                if n <= args.trials or s == "uniform":
                    at.setdefault(f"{n} trials", {}).setdefault(s, []).append(hv(prefix_after_trials(trace, n)))
            for m in args.after_minutes:
                keys = prefix_after_seconds(trace, measured.cost, 60 * m, upfront if s == "seeded" else 0.0)
                at.setdefault(f"{m:g} min", {}).setdefault(s, []).append(hv(keys))
    table = Table(title=f"hypervolume after {args.trials} trials (accuracy x latency x size, reference = FP32 at the "
                        f"budget; mean over seeds {args.seeds}; latency re-timed interleaved, median of "
                        f"{args.rounds} rounds)")
    for col in ("strategy", "mean", "min", "max", "vs random", "vs uniform", "skipped (pruned)"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    base = {k: statistics.mean(v) for k, v in results.items()}
    for s, vals in results.items():
        rel = lambda k: f"{base[s] / base[k]:.2f}x" if k in base and base[k] > 0 else "-"  # noqa: E731
        table.add_row(s, f"{base[s]:.4f}", f"{min(vals):.4f}", f"{max(vals):.4f}", rel("random"), rel("uniform"),
                      str(skipped[s]))
    console.print(table)
    if at:
        cp = Table(title="hypervolume at checkpoints (mean over seeds): after a strategy's first N trials, and "
                         "after T minutes of measurement (seeded: its sensitivity table charged first)")
        cp.add_column("checkpoint")
        for s in args.strategies:
            cp.add_column(s, justify="right")
        for label, by in at.items():
            cp.add_row(label, *[f"{statistics.mean(by[s]):.4f}" if s in by else "-" for s in args.strategies])
        console.print(cp)
    import datetime
    import os
    import platform

    console.print(f"measured {datetime.datetime.now().isoformat(timespec='minutes')} on {platform.node()} "
                  f"({measured.ev.backend.device()}), load average {os.getloadavg()[0]:.1f}; sensitivity one-off "
                  f"cost {upfront:.0f} s", highlight=False)
    console.print(f"{len(measured.cache)} distinct plans measured in {measured.seconds:.0f} s; FP32 re-timed p50 "
                  f"{latency[fp32_key]:.3f} ms", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
