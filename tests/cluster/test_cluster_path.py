"""The cluster path for real: `make cluster-up`'s topology, a study on it, a worker node killed mid-study.

cluster/up.sh starts a 2-node Ray cluster (head + 1 worker, token authentication), PostgreSQL databases for
Optuna's storage and MLflow's backend store on the machine's PostgreSQL (127.0.0.1:5432), and an MLflow server on
it; the search then runs exactly as a user's `make search` does with cluster/.env present. Skipped with the reason
where no PostgreSQL server or driver is available.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-cluster-pw"  # trust auth accepts any password: it must still appear nowhere


def _pg_ready() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "no PostgreSQL driver (pip install -e '.[cluster]')"
    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL on 127.0.0.1:5432: {exc}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_pg_ready() is not None, reason=str(_pg_ready()))]


def _cluster_env(prefix: str, ray_port: int, mlflow_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PRECISION_SEARCH_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(CLUSTER_WORKERS="1", CLUSTER_CPUS="1", CLUSTER_RAY_PORT=str(ray_port),
               CLUSTER_MLFLOW_PORT=str(mlflow_port), CLUSTER_DB_PREFIX=prefix,
               CLUSTER_PG_URL=f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432",
               VENV_BIN=str(Path(sys.executable).parent), PYTHONPATH=str(ROOT))
    return env


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    prefix = f"pstest_{uuid.uuid4().hex[:8]}"
    ray_port, mlflow_port = free_port(), free_port()
    env = _cluster_env(prefix, ray_port, mlflow_port)
    # A copy of the cluster scripts, so that this test's cluster/.env never touches the developer's checkout.
    scripts = tmp / "repo" / "cluster"
    scripts.mkdir(parents=True)
    for name in ("up.sh", "down.sh"):
        (scripts / name).write_text((ROOT / "cluster" / name).read_text())
    (tmp / "repo" / "mlflow").symlink_to(ROOT / "mlflow")
    up = subprocess.run(["bash", str(scripts / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert PASSWORD not in up.stdout + up.stderr
        addresses = _read_env(scripts / ".env")
        yield {"tmp": tmp, "env": {**env, **addresses}, "addresses": addresses, "scripts": scripts,
               "up_output": up.stdout + up.stderr}
    finally:
        down = subprocess.run(["bash", str(scripts / "down.sh")], env={**env, "CLUSTER_DROP_DB": "1"},
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def _config(tmp: Path, trials: int) -> Path:
    cfg = yaml.safe_load((ROOT / "search_spaces" / "digits_mlp.yaml").read_text())
    cfg["workdir"] = str(tmp / "work")
    cfg["search"].update(formats=["fp32", "int8", "int4"], int8_activations=["dynamic"], calibrations=["minmax"],
                         int4_block_sizes=[32, 64], trials=trials, max_accuracy_drop=0.05)
    path = tmp / f"cluster-{trials}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _search(cfg: Path, study: str, env: dict, **popen) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("precision-search")
    return subprocess.Popen([str(cli), "search", "--config", str(cfg), "--study", study, "--json", "--no-progress"],
                            env=env, cwd=cfg.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def _trial_runs(tracking_uri: str, experiment: str, study: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # the search has not created it yet
        return []
    return client.search_runs([exp.experiment_id], max_results=500,
                              filter_string=f"tags.`precision_search.role` = 'trial' and "
                                            f"tags.`precision_search.study` = '{study}'")


def test_study_spreads_over_both_nodes_and_hides_the_password(cluster):
    env, tmp = cluster["env"], cluster["tmp"]
    assert env["PRECISION_SEARCH_STORAGE"].startswith("postgresql")
    proc = _search(_config(tmp, 6), "spread", env)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    summary = json.loads(out)
    assert summary["trials_complete"] >= 6
    assert PASSWORD not in out + err, "the storage password was printed"

    runs = _trial_runs(env["MLFLOW_TRACKING_URI"], summary["experiment"], "spread")
    nodes = {r.data.tags.get("precision_search.node_id") for r in runs}
    assert None not in nodes and len(nodes) == 2, f"trials ran on nodes {nodes}"
    assert all(r.data.tags.get("precision_search.hostname") for r in runs)
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(summary["parent_run_id"])
    for run in [parent, *runs]:
        stored = json.dumps({**run.data.params, **run.data.tags})
        assert PASSWORD not in stored, f"password stored in run {run.info.run_id}"

    import optuna

    from pipeline.urls import normalize_db_url

    study = optuna.load_study(study_name="spread", storage=normalize_db_url(env["PRECISION_SEARCH_STORAGE"]))
    assert {t.user_attrs.get("node_id") for t in study.trials if t.state.name == "COMPLETE"} == nodes


def _worker_raylet(ray_port: int) -> int | None:
    """The pid of the worker node's raylet (the one of this cluster that is not the head)."""
    out = subprocess.run(["pgrep", "-af", "raylet/raylet"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, cmd = line.split(" ", 1)
        if f":{ray_port}" in cmd and "--head" not in cmd:
            return int(pid)
    return None


def test_worker_node_killed_mid_study_retries_its_trial(cluster):
    env, tmp = cluster["env"], cluster["tmp"]
    ray_port = int(cluster["addresses"]["RAY_ADDRESS"].rsplit(":", 1)[1])
    proc = _search(_config(tmp, 8), "node-loss", env)
    try:
        deadline = time.monotonic() + 300
        raylet = None
        # Wait until trials are being measured (the reference is built and both nodes took work).
        while time.monotonic() < deadline:
            if len(_trial_runs(env["MLFLOW_TRACKING_URI"], "digits-mlp", "node-loss")) >= 2:
                raylet = _worker_raylet(ray_port)
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(1)
        assert raylet, "the worker node's raylet was not found"
        os.kill(raylet, signal.SIGKILL)  # the node dies with whatever trial it was running
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    summary = json.loads(out)
    assert summary["trials_complete"] >= 8, summary
    import optuna

    from pipeline.urls import normalize_db_url

    study = optuna.load_study(study_name="node-loss", storage=normalize_db_url(env["PRECISION_SEARCH_STORAGE"]))
    baselines = [t for t in study.trials if t.user_attrs.get("baseline") and t.state.name == "COMPLETE"]
    assert len(baselines) >= 3, "a uniform baseline is missing after the node loss"
