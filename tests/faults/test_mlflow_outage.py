"""The MLflow tracking server stopped mid-search and started again: trials keep running, tracking is spooled
under the study folder, and once the server answers the record is backfilled from Optuna - every trial has
exactly one child run, nothing is lost, nothing is duplicated."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from tests.faults.helpers import ROOT, cli, optuna_study, search_args, start_cli, stop_group, study_runs
from tests.servers import free_port as _free_port, wait_healthy
from tests.test_mlflow_server import _server_env

SERVER = ROOT / "mlflow" / "server.sh"


def _start_server(tmp: Path, port: int, n: int) -> subprocess.Popen:
    log = open(tmp / f"server{n}.log", "w")
    proc = subprocess.Popen(["bash", str(SERVER)], env=_server_env(tmp, port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(proc, f"http://127.0.0.1:{port}", tmp / f"server{n}.log", timeout=120)
    return proc


def _wait_for(log: Path, pattern: str, proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return True
        if proc.poll() is not None:
            return bool(re.search(pattern, log.read_text()))
        time.sleep(0.2)
    return False


def test_server_stopped_and_restarted_mid_search_loses_and_duplicates_nothing(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    # trials of a few seconds each (the energy loop's minimum), so the server is back before the study ends
    args = search_args(work, "--trials", "10", "--parallel", "1", "--tracking-uri", uri,
                       **{"measure.energy.min_seconds": 4})
    server = _start_server(tmp_path, port, 1)
    log = tmp_path / "search.log"
    search = None
    try:
        search = start_cli(args, tmp_path, log)
        assert _wait_for(log, r"\[1/10\] trial", search, 300), log.read_text()[-3000:]
        stop_group(server, sig=15)  # the server goes away while trials run
        t_down = time.monotonic()
        assert _wait_for(log, "is unreachable", search, 120), log.read_text()[-3000:]
        time.sleep(max(0.0, 3 - (time.monotonic() - t_down)))
        server = _start_server(tmp_path, port, 2)
        search.wait(timeout=420)
        text = log.read_text()
        assert search.returncode == 0, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        assert "spooled event(s) backfilled" in text, text[-4000:]  # backfilled during the search
        assert "still unreachable at the end" not in text, text[-4000:]
    finally:
        if search is not None:
            stop_group(search)
        stop_group(server, sig=15)
    storage = f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}"
    study = optuna_study(storage)
    measured = {t.number for t in study.get_trials() if t.state.is_finished()
                and t.user_attrs.get("duplicate_of") is None}
    runs = study_runs(f"sqlite:///{tmp_path / 'server.db'}")
    numbers = Counter(n for n, _ in runs)
    assert all(c == 1 for c in numbers.values()), numbers
    assert set(numbers) == measured
    assert all(r.tags.get("precision_search.state") in ("COMPLETE", "FAIL") for _, r in runs)
    assert not list(work.rglob("mlflow-spool.jsonl"))  # backfilled, so the spool is gone


def test_server_still_down_at_the_end_is_backfilled_by_the_next_run(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    args = search_args(work, "--trials", "4", "--parallel", "1", "--tracking-uri", uri)
    server = _start_server(tmp_path, port, 1)
    log = tmp_path / "search.log"
    search = None
    try:
        search = start_cli(args, tmp_path, log)
        assert _wait_for(log, r"\[1/4\] trial", search, 300), log.read_text()[-3000:]
        stop_group(server, sig=15)  # and it stays down until the search has ended
        search.wait(timeout=420)
        text = " ".join(log.read_text().split())
        assert search.returncode == 0, text[-4000:]  # the study itself is complete
        assert "still unreachable at the end" in text and "run the same command again" in text, text[-4000:]
        assert list(work.rglob("mlflow-spool.jsonl"))
        server = _start_server(tmp_path, port, 2)
        again = cli(args, tmp_path, timeout=300)
        assert again.rc == 0 and "Traceback" not in again.text, again.text[-4000:]
    finally:
        if search is not None:
            stop_group(search)
        stop_group(server, sig=15)
    study = optuna_study(f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}")
    measured = {t.number for t in study.get_trials() if t.state.is_finished()
                and t.user_attrs.get("duplicate_of") is None}
    runs = study_runs(f"sqlite:///{tmp_path / 'server.db'}")
    numbers = Counter(n for n, _ in runs)
    assert all(c == 1 for c in numbers.values()), numbers
    assert set(numbers) == measured
    assert not list(work.rglob("mlflow-spool.jsonl"))
