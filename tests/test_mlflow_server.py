"""A real MLflow tracking server (mlflow/server.sh) on a loopback port: search over HTTP, promote,
read the registered version back through the REST API, and load it with ONNX Runtime.

The server runs as a subprocess in its own process group and is always terminated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import re

import pytest

from tests.servers import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "mlflow" / "server.sh"


def _get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _assert_loopback_only(port: int) -> None:
    """Every listening socket on ``port`` is bound to 127.0.0.1 (checked with ``ss`` where it exists)."""
    import shutil

    if not shutil.which("ss"):
        return
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.strip()
    assert out, f"nothing listens on port {port}"
    assert all(line.split()[3].startswith("127.0.0.1:") for line in out.splitlines()), out


def _server_env(tmp: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp / 'server.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "server-artifacts"),
        MLFLOW_SERVER_ENV=str(tmp / "no-such.env"),  # a developer's mlflow/server.env must not leak in
        MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")),
    )
    return env


@pytest.fixture
def server(tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(["bash", str(SERVER)], env=_server_env(tmp_path, port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, tmp_path / "server.log")
        yield base, tmp_path
    finally:
        stop(proc, log)


def test_server_script_binds_loopback_and_reads_its_settings(tmp_path):
    env = _server_env(tmp_path, 5999)
    env.pop("MLFLOW_PORT")
    (tmp_path / "s.env").write_text("MLFLOW_PORT=6123\nMLFLOW_WORKERS=3\n"
                                    "export MLFLOW_ALLOWED_HOSTS='mlflow.internal'\n")
    env["MLFLOW_SERVER_ENV"] = str(tmp_path / "s.env")
    env["MLFLOW_WORKERS"] = "1"  # the environment wins over the file
    out = subprocess.run(["bash", str(SERVER), "--print"], env=env, capture_output=True, text=True, check=True).stdout
    assert "--host 127.0.0.1" in out and "--port 6123" in out and "--workers 1" in out
    assert "--allowed-hosts mlflow.internal" in out and "--serve-artifacts" in out
    assert f"sqlite:///{tmp_path / 'server.db'}" in out
    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:s3cret@db.internal:5432/mlflow"
    done = subprocess.run(["bash", str(SERVER), "--print"], env=env, capture_output=True, text=True)
    assert "s3cret" not in done.stdout + done.stderr
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        assert done.returncode == 2 and "[cluster]" in done.stderr
    else:
        assert re.search(r"postgresql\+psycopg2?://mlflow:\*\*\*@db\.internal", done.stdout), done.stdout
    assert not list((ROOT / "mlflow").glob("*.py")), "mlflow/ must hold no Python module (it would shadow mlflow)"


@pytest.mark.slow
def test_search_promote_and_rest_round_trip_over_http(server, tmp_path, monkeypatch, capsys):
    import yaml
    from mlflow import MlflowClient

    from pipeline.cli import main
    from tests.pipeline.promotion.test_promotion import TINY, tiny_search

    base, server_tmp = server
    _assert_loopback_only(int(base.rsplit(":", 1)[1]))
    # As a user would: the tracking URI in the environment. (Later commands get --tracking-uri too: in this
    # one process the search's tracker has marked that env value as its own, see pipeline.tracking.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    found = tiny_search(tmp_path / "search", tracking_uri=base, study="over-http")
    capsys.readouterr()  # MLflow prints "View run ... at http://..." for each run the search closed
    client = MlflowClient(base, registry_uri=base)
    runs = client.search_runs([client.get_experiment_by_name(found.experiment).experiment_id],
                              filter_string="tags.`precision_search.role` = 'trial'")
    assert len(runs) >= TINY["search.trials"] and any(r.data.tags.get("pareto") == "true" for r in runs)
    # Artifacts went through the server's proxy into its destination, not to a client-side path.
    stored = list((server_tmp / "server-artifacts").rglob("*.onnx"))
    assert stored, "no ONNX model under the server's --artifacts-destination"

    cfg_file = tmp_path / "cfg.yaml"
    data = found.config().model_dump(mode="json", exclude={"base_dir"})
    data["tracking"] = {"registry_name": "digits-http", "alias": "champion"}
    cfg_file.write_text(yaml.safe_dump(data))
    rc = main(["promote", "--config", str(cfg_file), "--study", "over-http", "--policy", "knee", "--json",
               "--tracking-uri", base])
    out = capsys.readouterr().out
    assert rc == 0, out
    promoted = json.loads(out)
    assert promoted["tracking_uri"] == base and promoted["trial"] == found.knee

    # Read the version back through the REST API, as any non-Python client would.
    by_alias = _get(base, "/api/2.0/mlflow/registered-models/alias", name="digits-http", alias="champion")
    mv = by_alias["model_version"]
    assert mv["version"] == promoted["version"] and mv["run_id"] == promoted["run_id"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert tags["precision_search.trial_number"] == str(promoted["trial"])
    assert tags["precision_search.study"] == "over-http"
    assert tags["backend"] == "ort-cpu" and tags["energy_source"] in ("estimated", "rapl", "nvml")
    assert "layers:" in tags["precision_search.plan"] and "metric.accuracy" in tags
    assert "precision-search load digits-http@champion" in mv["description"]
    assert mv["source"] == f"models:/{promoted['model_id']}"
    rm = _get(base, "/api/2.0/mlflow/registered-models/get", name="digits-http")["registered_model"]
    assert {"alias": "champion", "version": promoted["version"]} in rm["aliases"]
    run = _get(base, "/api/2.0/mlflow/runs/get", run_id=promoted["run_id"])["run"]
    run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run_tags["pareto"] == "true" and run_tags["precision_search.registered"] == f"digits-http/{promoted['version']}"

    # Promote again: no second version.
    rc = main(["promote", "--config", str(cfg_file), "--study", "over-http", "--trial", str(promoted["trial"]), "--json",
               "--tracking-uri", base])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and again["created"] is False and again["version"] == promoted["version"]
    versions = _get(base, "/api/2.0/mlflow/model-versions/search", filter="name='digits-http'")["model_versions"]
    assert len(versions) == 1

    # Load it over HTTP and run the eval set with ONNX Runtime.
    rc = main(["load", "digits-http@champion", "--config", str(cfg_file), "--json", "--tracking-uri", base])
    loaded = json.loads(capsys.readouterr().out)
    assert rc == 0 and loaded["version"] == promoted["version"]
    accuracy = client.get_run(promoted["run_id"]).data.metrics["accuracy"]
    assert loaded["value"] == pytest.approx(accuracy, abs=1e-9)

    # `search --json` over HTTP: MLflow's "View run ... at http://..." lines go to stderr, stdout is one
    # JSON document (resuming the finished study: one more trial).
    # (its Optuna storage is the one the search used: resuming against an empty default database is refused)
    rc = main(["search", "--config", str(cfg_file), "--study", "over-http", "--trials", str(TINY["search.trials"] + 1),
               "--json", "--tracking-uri", base, "--storage", found.storage, "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    summary = json.loads(out.out)
    assert rc == 0 and summary["study"] == "over-http" and "View run" not in out.out


@pytest.mark.slow
def test_ui_script_serves_the_local_store_on_loopback(tmp_path):
    from mlflow import MlflowClient

    workdir = tmp_path / "work"
    workdir.mkdir()
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").create_experiment(
        "from-the-search", artifact_location=(workdir / "mlartifacts" / "x").as_uri())
    port = free_port()
    env = dict(os.environ, MLFLOW_PORT=str(port), PRECISION_SEARCH_WORKDIR=str(workdir),
               MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")))
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(["bash", str(ROOT / "mlflow" / "ui.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, tmp_path / "ui.log")
        names = [e["name"] for e in _get(base, "/api/2.0/mlflow/experiments/search", max_results=10)["experiments"]]
        assert "from-the-search" in names
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            assert b"<html" in r.read(200).lower()
        _assert_loopback_only(port)
    finally:
        stop(proc, log)
