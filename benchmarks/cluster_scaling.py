"""Trials per minute on a 2-node Ray cluster versus 1 node: the same study, the same topology, one run.

For each cluster size (1 node, then 2 nodes) this starts a fresh local cluster with
``cluster/up.sh`` (Ray with token authentication, PostgreSQL for Optuna and as
MLflow's backend store, an MLflow server), runs ``precision-search search`` on it
exactly as ``make search`` does with ``cluster/.env`` present (same config, same
``--trials``, a new study), reads the study back from PostgreSQL and stops the
cluster with ``cluster/down.sh`` (its databases dropped).

Reported per size:

* ``trial window``: from the first measured trial's start to the last one's end,
  as Optuna stored them; ``trials/min`` = measured trials / window. This is the
  throughput the cluster gives once the study runs (the one-off setup - reference
  export, connecting, MLflow's experiment - is not in it);
* ``end to end``: the command's wall time, setup included;
* ``per node``: how many trials each Ray node ran (from the ``node_id`` user
  attribute every trial records), i.e. how evenly trials were spread.

* ``driver CPU s/trial``: CPU time of the search process (the driver: Optuna, MLflow
  client, front plots) per trial, its start (imports, the reference) and end (the
  review) included; ``in window``: the same between the first trial's start and the
  last one's end (sampled from /proc), i.e. what recording a trial costs the driver;
  ``load``: the host's 1-minute load average when the run ended (other work on the
  host slows both sizes, unevenly).

The ratio printed last is 2-node trials/min over 1-node trials/min (and the same for
end-to-end). Both clusters run on this one host: each node is given
``CLUSTER_CPUS`` CPUs (default 1, so a 2-core machine holds two nodes), and the
driver, the MLflow server and PostgreSQL share the same cores. On a 2-core host the
1-node run has a spare core for them and the 2-node run has none, which bounds the
ratio below 2 whatever the scheduler does: 2 nodes can at most reach
``2 / (trial CPU + driver-side CPU per trial)`` trials/s against 1-node's
``1 / trial CPU``. ``--repeat N`` interleaves the sizes N times (1, 2, 1, 2, ...) and
keeps each size's best run: noise from other work on the host only ever slows a run.
Needs PostgreSQL on 127.0.0.1:5432 (or ``CLUSTER_PG_URL``) and the ``[cluster]`` extra.

Trial length matters: the driver records every trial (Optuna, MLflow run, artifacts, the
logged model) at a roughly fixed cost, so very short trials measure that overhead more
than the cluster. ``--preset quick`` (the default) runs the digits MLP as configured
(~1.7 s trials); ``--preset realistic`` lengthens each trial's measurement window
(``measure.energy.min_seconds``) so trials take ~10 s, closer to real models' tens of
seconds. ``--set KEY=VALUE`` passes any other config override to the search.

Run: ``.venv/bin/python benchmarks/cluster_scaling.py`` (a few minutes);
``--trials N`` (default 16), ``--repeat N`` (default 1), ``--preset quick|realistic``,
``--set KEY=VALUE``, ``--config`` (default search_spaces/digits_mlp.yaml), ``--json`` for
machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Config overrides per preset (``--set`` values, YAML): how long one trial takes.
PRESETS: dict[str, list[str]] = {
    "quick": [],  # the config as it is: digits MLP trials of ~1.7 s, mostly the 3 x 0.5 s energy window
    "realistic": ["measure.energy.min_seconds=3"],  # 3 x 3 s energy windows: trials of ~10 s
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(src: Path, tmp: Path, trials: int) -> Path:
    cfg = yaml.safe_load(src.read_text())
    cfg["workdir"] = str(tmp / "work")
    cfg["search"]["trials"] = trials
    path = tmp / src.name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _sample_cpu(proc: subprocess.Popen, every_s: float = 0.25) -> list[tuple[float, float]]:
    samples = []
    while proc.poll() is None:
        cpu = _cpu_seconds(proc.pid)
        if cpu is not None:
            samples.append((time.time(), cpu))
        time.sleep(every_s)
    return samples


def _window_cpu(samples: list[tuple[float, float]], start: float, end: float, trials: int) -> float | None:
    """The driver's CPU seconds per trial between the first trial's start and the last one's end: what it
    spends recording trials (Optuna, MLflow, the front), without its one-off start and finish."""
    inside = [c for t, c in samples if start <= t <= end]
    if len(inside) < 2 or not trials:
        return None
    return round((inside[-1] - inside[0]) / trials, 3)


def run_size(nodes: int, cpus: int, trials: int, config: Path, tmp: Path, overrides: list[str] = ()) -> dict:
    """Start a ``nodes``-node cluster, run one study of ``trials`` trials on it, stop it; the numbers."""
    work = tmp / f"nodes{nodes}"
    scripts = work / "repo" / "cluster"
    scripts.mkdir(parents=True)
    for name in ("up.sh", "down.sh"):  # a copy: this run's cluster/.env never touches the checkout's
        shutil.copy(ROOT / "cluster" / name, scripts / name)
    (work / "repo" / "mlflow").symlink_to(ROOT / "mlflow")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PRECISION_SEARCH_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(CLUSTER_WORKERS=str(nodes - 1), CLUSTER_CPUS=str(cpus), CLUSTER_RAY_PORT=str(_free_port()),
               CLUSTER_MLFLOW_PORT=str(_free_port()), CLUSTER_DB_PREFIX=f"psbench_{uuid.uuid4().hex[:8]}",
               VENV_BIN=str(Path(sys.executable).parent), PYTHONPATH=str(ROOT))
    up = subprocess.run(["bash", str(scripts / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        raise SystemExit(f"cluster/up.sh failed ({nodes} node(s)):\n{up.stdout}{up.stderr}")
    try:
        env.update(_read_env(scripts / ".env"))
        cfg = _config(config, work, trials)
        cli = Path(sys.executable).with_name("precision-search")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        sets = [a for o in overrides for a in ("--set", o)]
        with open(work / "search.out", "w+") as out, open(work / "search.err", "w+") as err:
            proc = subprocess.Popen([str(cli), "search", "--config", str(cfg), "--study", f"scale-{nodes}", "--json",
                                     "--no-progress", *sets], env=env, cwd=work, stdout=out, stderr=err, text=True)
            samples = _sample_cpu(proc)  # (wall clock, the driver's CPU seconds so far), every 0.25 s
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        driver_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        load = os.getloadavg()[0]
        if proc.returncode != 0:
            raise SystemExit(f"search failed on {nodes} node(s):\n{stderr[-4000:]}")
        summary = json.loads(stdout)
        import optuna

        from pipeline.urls import normalize_db_url

        study = optuna.load_study(study_name=f"scale-{nodes}",
                                  storage=normalize_db_url(env["PRECISION_SEARCH_STORAGE"]))
        done = [t for t in study.trials if t.state.name in ("COMPLETE", "FAIL") and t.datetime_complete
                and t.user_attrs.get("duplicate_of") is None and not t.user_attrs.get("orphaned")]
        start = min(t.datetime_start for t in done)
        end = max(t.datetime_complete for t in done)
        window = (end - start).total_seconds()
        per_node = Counter(t.user_attrs.get("node_id", "?")[:8] for t in done)
        return {"nodes": nodes, "cpus_per_node": cpus, "trials": len(done), "window_s": round(window, 1),
                "trials_per_min": round(60 * len(done) / window, 2), "end_to_end_s": round(wall, 1),
                "trials_per_min_end_to_end": round(60 * len(done) / wall, 2), "per_node": dict(per_node),
                "parallel": summary["parallel"], "trials_failed": summary["trials_failed"],
                "driver_cpu_s_per_trial": round(driver_cpu / max(1, len(done)), 2), "load_1min": round(load, 1),
                "driver_cpu_s_per_trial_in_window": _window_cpu(samples, start.timestamp(), end.timestamp(), len(done)),
                "trial_seconds_median": round(sorted(t.user_attrs.get("seconds", 0.0) for t in done)[len(done) // 2], 2)}
    finally:
        subprocess.run(["bash", str(scripts / "down.sh")], env={**env, "CLUSTER_DROP_DB": "1"},
                       capture_output=True, text=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--config", default=str(ROOT / "search_spaces" / "digits_mlp.yaml"))
    ap.add_argument("--cpus", type=int, default=int(os.environ.get("CLUSTER_CPUS", "1")),
                    help="CPUs each node offers Ray (default $CLUSTER_CPUS or 1)")
    ap.add_argument("--repeat", type=int, default=1, help="interleave the sizes this many times, keep each's best")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                    help="trial length: quick (~1.7 s digits MLP trials) or realistic (~10 s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the search (repeatable), after the preset's")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    overrides = PRESETS[args.preset] + args.set
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ps-scaling-") as tmp:
        for i in range(args.repeat):
            for n in (1, 2):
                runs.append(run_size(n, args.cpus, args.trials, Path(args.config), Path(tmp) / f"r{i}", overrides))
                print(f"  run {len(runs)}: {runs[-1]}", file=sys.stderr)
    rows = [max((r for r in runs if r["nodes"] == n), key=lambda r: r["trials_per_min"]) for n in (1, 2)]
    one, two = rows
    ratio = two["trials_per_min"] / one["trials_per_min"]
    ratio_e2e = two["trials_per_min_end_to_end"] / one["trials_per_min_end_to_end"]
    if args.json:
        print(json.dumps({"rows": rows, "runs": runs, "ratio_trial_window": round(ratio, 2),
                          "ratio_end_to_end": round(ratio_e2e, 2), "host_cpus": os.cpu_count(),
                          "preset": args.preset, "overrides": overrides}, indent=2))
        return 0
    print(f"host: {os.cpu_count()} CPU(s); study: {Path(args.config).name}, {args.trials} trials, preset "
          f"{args.preset} {overrides or ''}; {args.cpus} CPU(s) per node")
    print(f"{'nodes':>5} {'trials':>6} {'window s':>9} {'trials/min':>10} {'end-to-end s':>12} "
          f"{'e2e trials/min':>14} {'trial s':>7} {'driver CPU s/trial':>18} {'in window':>9} {'load':>5}  per node")
    for r in rows:
        print(f"{r['nodes']:>5} {r['trials']:>6} {r['window_s']:>9} {r['trials_per_min']:>10} "
              f"{r['end_to_end_s']:>12} {r['trials_per_min_end_to_end']:>14} {r['trial_seconds_median']:>7} "
              f"{r['driver_cpu_s_per_trial']:>18} {str(r['driver_cpu_s_per_trial_in_window']):>9} "
              f"{r['load_1min']:>5}  {r['per_node']}")
    print(f"(best of {args.repeat} interleaved run(s) per size)")
    print(f"2 nodes / 1 node: {ratio:.2f}x trials/min over the trial window, {ratio_e2e:.2f}x end to end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
