"""A Ray worker SIGKILLed mid-trial (what the OOM killer or a lost node does): the trial is retried a bounded
number of times, the uniform baselines are always completed, the study reaches its target, and the driver
goes on without a traceback."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from tests.faults.helpers import optuna_study, search_args, start_cli, stop_group


def _trial_workers(prefix: str) -> dict[int, str]:
    """pid -> process title of Ray workers running a task named ``prefix...`` (Ray sets ``ray::<task name>``)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            title = (d / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(f"ray::{prefix}"):
            found[int(d.name)] = title
    return found


def test_worker_killed_mid_trial_is_retried_and_baselines_complete(tmp_path):
    study = f"kill-{uuid.uuid4().hex[:6]}"
    work = tmp_path / "work"
    log = tmp_path / "search.log"
    # measure.runs high enough that a trial lasts long enough to be caught running
    p = start_cli(search_args(work, "--study", study, "--trials", "3", "--parallel", "1", **{"measure.runs": 400}),
                  tmp_path, log)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and p.poll() is None:
            for pid, title in _trial_workers(f"{study}-trial-").items():
                os.kill(pid, signal.SIGKILL)
                killed = int(title.split("-trial-")[1].split()[0])
                break
            time.sleep(0.02)
        assert killed is not None, f"no trial worker seen running:\n{log.read_text()[-3000:]}"
        p.wait(timeout=420)
    finally:
        stop_group(p)
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    s = optuna_study(f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}", study)
    trials = {t.number: t for t in s.get_trials()}
    dead = trials[killed]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed]
    if dead.state.name == "FAIL":  # the driver saw the death: the plan ran again as a new trial
        assert dead.user_attrs.get("system_retried"), dead.user_attrs
        assert retries and retries[0].state.name == "COMPLETE", [(t.number, t.state) for t in retries]
        assert retries[0].params == dead.params
    else:  # Ray's own task retry (ray_exec max_retries) ran it again inside the same trial
        assert dead.state.name == "COMPLETE"
    baselines = {t.user_attrs["baseline"] for t in trials.values()
                 if t.user_attrs.get("baseline") and t.state.name == "COMPLETE"}
    assert baselines == {"uniform-fp32", "uniform-int8"}
    from pipeline.search.storage import study_counts

    assert study_counts(s).measured == 3  # the dead trial does not count; the target was still reached
