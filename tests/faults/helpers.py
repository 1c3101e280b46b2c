"""Real processes for the fault tests: the ``precision-search`` CLI as a subprocess on a tiny digits MLP study.

Every search here is the digits MLP with two formats (fp32, int8), one INT8 recipe and a handful of trials,
so one run costs well under a minute on two cores. Nothing is mocked: Optuna on SQLite, MLflow (SQLite
store or a real ``mlflow server``), a local Ray the command starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "search_spaces" / "digits_mlp.yaml"

TINY_SETS = {
    "measure.runs": 5,
    "measure.warmup": 1,
    "measure.energy.min_seconds": 0.05,
    "measure.energy.repeats": 1,
    "search.formats": "[fp32, int8]",
    "search.int8_activations": "[dynamic]",
    "search.calibrations": "[minmax]",
    "search.trials": 3,
}


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PRECISION_SEARCH_STORAGE", None)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def search_args(workdir: Path, *extra: str, **sets) -> list[str]:
    args = ["search", "--config", str(CONFIG), "--set", f"workdir={workdir}"]
    for k, v in {**TINY_SETS, **sets}.items():
        args += ["--set", f"{k}={v}"]
    return args + ["--no-progress", *extra]


@dataclass
class Done:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> Done:
    """Run ``python -m pipeline.cli ARGS`` to the end in its own process group."""
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env or cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{args[0]} did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return Done(p.returncode, out, err)


def start_cli(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env or cli_env(),
                            stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)


def assert_clear_error(done: Done, *needles: str) -> None:
    """Exit non-zero with one message (no traceback) that contains every needle."""
    assert done.rc != 0, done.text[-3000:]
    assert "Traceback" not in done.text, done.text[-5000:]
    for n in needles:
        assert n in done.text, f"{n!r} not in:\n{done.text[-3000:]}"


@dataclass
class Run:
    run_id: str
    status: str
    tags: dict[str, str]


def study_runs(tracking_uri: str, study: str = "digits-mlp") -> list[tuple[int, Run]]:
    """The study's child runs in a SQLite MLflow store, read with sqlite3 (this process keeps no MLflow
    engine on a file a test deletes): list of (trial number, run)."""
    import sqlite3

    path = tracking_uri[len("sqlite:///"):]
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT r.run_uuid, r.status, t.key, t.value FROM runs r JOIN tags t "
                           "ON t.run_uuid = r.run_uuid WHERE r.lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()
    runs: dict[str, Run] = {}
    for run_id, status, key, value in rows:
        runs.setdefault(run_id, Run(run_id, status, {})).tags[key] = value
    return [(int(r.tags["precision_search.trial_number"]), r) for r in runs.values()
            if r.tags.get("precision_search.study") == study and r.tags.get("precision_search.role") == "trial"]


def optuna_study(storage: str, study: str = "digits-mlp"):
    import optuna

    return optuna.load_study(study_name=study, storage=storage)
