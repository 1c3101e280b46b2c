"""The search driver SIGKILLed mid-study (with the local Ray it started), then the same command again: the
trial it left running is marked failed (orphaned) and retried, finished trials are kept, the counts come from
the storage, and MLflow holds exactly one run per trial."""

from __future__ import annotations

import re
import time
from collections import Counter

from tests.faults.helpers import cli, optuna_study, search_args, start_cli, stop_group, study_runs


def _third_trial_in_flight(p, log, trials: int) -> None:
    """Wait until the driver logged its second finished trial (of ``trials``), then a moment: the third runs."""
    deadline = time.monotonic() + 300
    while not re.search(rf"\[2/{trials}\] trial", log.read_text()) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, log.read_text()[-3000:]
    time.sleep(0.5)


def _start(tmp_path, trials: int):
    """The search command, started: (workdir, its arguments, its log, the process). Unseeded: after the
    baselines a seeded driver re-times them, with no trial in flight for a moment."""
    work = tmp_path / "work"
    args = search_args(work, "--trials", str(trials), "--parallel", "1",
                       **{"measure.energy.min_seconds": 1, "search.sensitivity.seed": "false"})
    log = tmp_path / "first.log"
    return work, args, log, start_cli(args, tmp_path, log)


def test_driver_sigkill_then_resume(tmp_path):
    work, args, log, p = _start(tmp_path, 5)
    try:
        _third_trial_in_flight(p, log, 5)
    finally:
        stop_group(p)  # SIGKILL to the driver's whole process group
    done = cli(args, tmp_path, timeout=400)
    assert done.rc == 0, done.text[-4000:]
    assert "Traceback" not in done.text
    s = optuna_study(f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}")
    from pipeline.search.storage import study_counts

    counts = study_counts(s)
    assert counts.measured == 5 and counts.running == 0
    orphans = [t for t in s.get_trials() if t.user_attrs.get("orphaned")]
    assert orphans, "the kill should have caught a trial in flight"
    for o in orphans:
        assert any(t.user_attrs.get("retry_of") == o.number for t in s.get_trials())
    assert f"{counts.complete} complete, {counts.failed} failed" in " ".join(done.text.split())
    runs = study_runs(f"sqlite:///{work / 'mlflow.db'}")
    numbers = Counter(n for n, _ in runs)
    assert all(c == 1 for c in numbers.values()), numbers
    assert set(numbers) == {t.number for t in s.get_trials() if t.state.is_finished()
                            and t.user_attrs.get("duplicate_of") is None}
    assert all(r.status in ("FINISHED", "FAILED") for _, r in runs)


def test_driver_sigterm_ends_cleanly_then_resumes(tmp_path):
    """SIGTERM to the driver alone (what `kill PID` or a batch scheduler sends): the search takes its clean
    interrupt path (Ray's own SIGTERM handler, installed by ray.init, used to abort it with a core dump and
    exit 134), orphans and re-queues the trial in flight, and the same command then finishes the study."""
    import os
    import signal

    work, args, log, p = _start(tmp_path, 4)
    try:
        _third_trial_in_flight(p, log, 4)
        os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        stop_group(p)
    text = log.read_text()
    assert rc == 130 and "interrupted" in text, text[-3000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    s = optuna_study(f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}")
    assert not [t for t in s.get_trials() if t.state.name == "RUNNING"]  # nothing left for a resume to guess about
    orphans = [t for t in s.get_trials() if t.user_attrs.get("orphaned")]
    assert orphans and all(t.state.name == "FAIL" for t in orphans), ([(t.number, t.state.name) for t in s.get_trials()], text[-2500:])
    done = cli(args, tmp_path, timeout=400)
    assert done.rc == 0, done.text[-4000:]
    from pipeline.search.storage import study_counts

    assert study_counts(optuna_study(f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}")).measured == 4
