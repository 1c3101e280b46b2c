"""Three ``search`` drivers started together on a fresh workdir (different studies, one Optuna database and
one MLflow store): each store is created and migrated once, under a file lock, and all three succeed."""

from __future__ import annotations

from tests.faults.helpers import optuna_study, search_args, start_cli, stop_group, study_runs


def test_three_drivers_on_a_fresh_workdir_all_succeed(tmp_path):
    work = tmp_path / "work"
    procs = []
    try:
        for i in range(3):
            args = search_args(work, "--study", f"s{i}", "--trials", "1", "--parallel", "1")
            procs.append(start_cli(args, tmp_path, tmp_path / f"s{i}.log"))
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            stop_group(p)
    logs = [(tmp_path / f"s{i}.log").read_text() for i in range(3)]
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"driver s{i}:\n{log[-4000:]}"
        assert "Traceback" not in log, log[-4000:]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"sqlite:///{work / 'digits-mlp' / 'optuna.db'}"
    for i in range(3):
        assert len(optuna_study(storage, f"s{i}").get_trials()) >= 1
        assert len(study_runs(uri, study=f"s{i}")) >= 1
