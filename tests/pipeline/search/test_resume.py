"""Kill the search driver with SIGKILL mid-study, run the same command again: the study resumes.

Real processes throughout: the driver is a subprocess running the CLI with its own
local Ray, Optuna on SQLite and MLflow on SQLite, exactly as `make search` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import mlflow
import optuna
import pytest

from pipeline.tracking import schema as S
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TRIALS = 6


def _command(work) -> list[str]:
    return [
        sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
        "search", "--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--trials", str(TRIALS),
        "--parallel", "2", "--no-progress",
        "--set", f"workdir={work}", "--set", "measure.runs=5", "--set", "measure.warmup=1",
        "--set", "measure.energy.min_seconds=0.05", "--set", "measure.energy.repeats=1",
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PRECISION_SEARCH_STORAGE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _snapshot(storage: str, name: str):
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # noqa: BLE001 - not created yet
        return None
    return study.get_trials(deepcopy=True)


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc; no psutil in the venv)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver only (the crash under test), then clean up what it had started."""
    children = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10  # Ray's fate-sharing stops most of them
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    for c in children:  # agents Ray leaves behind when its driver is SIGKILLed
        if _alive(c):
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigkill_mid_study_then_resume(tmp_path):
    work = tmp_path / "work"
    storage = f"sqlite:///{(work / 'digits-mlp').resolve()}/optuna.db"
    first = subprocess.Popen(_command(work), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    trials = None
    while time.monotonic() < deadline:
        time.sleep(0.3)
        assert first.poll() is None, "the driver ended before it could be killed:\n" + first.stdout.read()
        trials = _snapshot(storage, "digits-mlp")
        if trials is None:
            continue
        done = [t for t in trials if t.state.name == "COMPLETE"]
        running = [t for t in trials if t.state.name == "RUNNING"]
        if done and running:
            break
    else:
        pytest.fail("no trials completed within 240 s")
    _kill_driver(first)
    before = {t.number: t for t in _snapshot(storage, "digits-mlp")}
    completed_before = {n: t for n, t in before.items() if t.state.name == "COMPLETE"}
    orphans = {n: t for n, t in before.items() if t.state.name == "RUNNING"}
    assert completed_before and orphans

    second = subprocess.run(_command(work), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=420)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed:" in second.stdout
    # the summary counts the storage's FAIL trials the orphans became, not "0 failed"
    assert f"{len(orphans)} orphaned by a stopped driver and retried" in second.stdout

    after = {t.number: t for t in optuna.load_study(study_name="digits-mlp", storage=storage).get_trials()}
    # nothing finished is lost or changed
    for n, t in completed_before.items():
        assert after[n].state.name == "COMPLETE" and after[n].values == t.values
        assert after[n].user_attrs["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
    # orphans: failed, marked, and re-run once with the same parameters (a trial killed in the
    # instant between Optuna's ask and its first parameter had nothing to retry)
    for n, t in orphans.items():
        assert after[n].state.name == "FAIL" and after[n].user_attrs["orphaned"] is True
        retries = [r for r in after.values() if r.user_attrs.get("retry_of") == n]
        assert len(retries) == (1 if t.params or t.user_attrs.get("baseline") else 0)
        for r in retries:
            assert r.state.name in ("COMPLETE", "FAIL")
            assert r.user_attrs.get("baseline") == t.user_attrs.get("baseline")
            if t.params:
                assert r.params == t.params
    # the study reached its target of finished (non-orphaned) trials, and repeated nothing
    finished = [t for t in after.values() if t.state.name in ("COMPLETE", "FAIL") and not t.user_attrs.get("orphaned")]
    assert len(finished) == TRIALS
    assert not [t for t in after.values() if t.state.name in ("RUNNING", "WAITING")]
    labels = [t.user_attrs["baseline"] for t in finished if t.user_attrs.get("baseline")]
    assert sorted(labels) == sorted(set(labels))  # each uniform baseline measured once
    retried = {t.user_attrs.get("retry_of") for t in after.values()} - {None}
    assert retried <= set(orphans)  # only orphans were retried

    # MLflow: still one parent (now finished); orphans' runs FAILED; every finished trial has its run
    client = mlflow.MlflowClient(f"sqlite:///{work.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("digits-mlp")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(S.TAG_ROLE) == S.ROLE_STUDY]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {}
    for r in runs:
        if r.data.tags.get(S.TAG_ROLE) == S.ROLE_TRIAL:
            children.setdefault(int(r.data.tags[S.TAG_TRIAL_NUMBER]), []).append(r)
    for n in orphans:
        for r in children.get(n, []):
            assert r.info.status == "FAILED" and "orphaned" in r.data.tags[S.TAG_FAIL_REASON]
    for t in finished:
        assert len(children[t.number]) == 1
        run = children[t.number][0]
        assert run.data.tags[S.TAG_STATE] == t.state.name
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "FAILED")
