"""The workdir is anchored to the config's project, and read commands never create an empty store.

Real files, real Optuna/MLflow/SQLite: a config in a project folder (marked by pyproject.toml) is used from an
unrelated current folder. Read commands (`front`, `promote`, `load`, `make ui`'s script) on a store that does
not exist fail, name the absolute path they looked at, and leave the disk as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import PROJECT_MARKERS, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]
PRESET = ROOT / "search_spaces" / "digits_mlp.yaml"


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """<tmp>/proj/pyproject.toml + <tmp>/proj/configs/my.yaml, and the current folder <tmp>/elsewhere."""
    for var in ("MLFLOW_TRACKING_URI", "PRECISION_SEARCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    cfg = yaml.safe_load(PRESET.read_text())
    cfg.pop("workdir", None)
    cfg["tracking"] = {"registry_name": "mine", "alias": "champion"}
    path = proj / "configs" / "my.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return {"tmp": tmp_path, "proj": proj, "config": path, "elsewhere": elsewhere}


def test_relative_workdir_is_anchored_to_the_project_not_the_current_folder(project):
    cfg = load_config(project["config"])
    assert cfg.work_root == project["proj"] / ".precision-search"
    assert cfg.work_path == project["proj"] / ".precision-search" / cfg.name
    assert str(project["config"]) in cfg.work_where
    moved = load_config(project["config"], overrides={"workdir": "runs/here"})
    assert moved.work_root == project["proj"] / "runs" / "here"
    absolute = load_config(project["config"], overrides={"workdir": str(project["tmp"] / "abs")})
    assert absolute.work_root == project["tmp"] / "abs"
    # built in memory (pipeline.api): no config file, so the current folder, as before
    mem = parse_config(yaml.safe_load(project["config"].read_text()), base_dir=Path.cwd())
    assert mem.work_root == project["elsewhere"] / ".precision-search"
    # the repo's presets keep writing to <repo>/.precision-search, from any folder
    assert load_config(PRESET).work_root == ROOT / ".precision-search"


def test_without_project_markers_the_config_folder_or_an_existing_workdir_anchors(tmp_path, monkeypatch):
    def enclosing_project(d: Path) -> Path | None:
        return next((a for a in d.parents if any((a / m).exists() for m in (*PROJECT_MARKERS, ".precision-search"))),
                    None)

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(PRESET.read_text())
    outer = enclosing_project(tmp_path)  # None on a normal machine; a project above the temp folder wins otherwise
    expected = folder if outer is None else outer
    assert load_config(folder / "c.yaml").work_root == expected / ".precision-search"
    (tmp_path / "a" / ".precision-search").mkdir()  # a project searched before: its store is found first
    assert load_config(folder / "c.yaml").work_root == tmp_path / "a" / ".precision-search"


def test_front_finds_the_study_written_under_the_project_from_another_folder(project, capsys):
    import optuna

    cfg = load_config(project["config"])
    cfg.work_path.mkdir(parents=True)
    from pipeline.search.storage import A_OBJECTIVES

    study = optuna.create_study(study_name=cfg.name, storage=f"sqlite:///{cfg.work_path / 'optuna.db'}",
                                directions=["maximize", "minimize", "minimize"])
    study.set_user_attr(A_OBJECTIVES, ["accuracy", "latency", "size"])
    assert main(["front", "--config", str(project["config"])]) == 0
    out = capsys.readouterr().out
    assert "the front is empty" in out
    assert "eval batch" in out  # what decides every row besides its plan
    assert not (project["elsewhere"] / ".precision-search").exists()


@pytest.mark.parametrize("argv, flag, missing", [
    (["front", "--config", "{config}"], "--storage", "proj/.precision-search/digits-mlp/optuna.db"),
    (["promote", "--config", "{config}", "--policy", "knee"], "--tracking-uri", "proj/.precision-search/mlflow.db"),
    (["load", "--config", "{config}"], "--tracking-uri", "proj/.precision-search/mlflow.db"),
    (["load", "mine@champion"], "--tracking-uri", "elsewhere/.precision-search/mlflow.db"),
    (["front", "--config", "{config}", "--storage", "sqlite:///{tmp}/nowhere/optuna.db"], "--storage",
     "nowhere/optuna.db"),
    (["promote", "--config", "{config}", "--policy", "knee", "--storage", "sqlite:///{tmp}/nowhere/optuna.db"],
     "--storage", "nowhere/optuna.db"),
    (["load", "mine@champion", "--tracking-uri", "sqlite:///{tmp}/nowhere/mlflow.db"], "--tracking-uri",
     "nowhere/mlflow.db"),
])
def test_read_commands_refuse_a_missing_store_and_create_nothing(project, capsys, argv, flag, missing):
    before = _snapshot(project["tmp"])
    args = [a.format(config=project["config"], tmp=project["tmp"]) for a in argv]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{flag}: no " in err and str(project["tmp"] / missing) in err, err
    assert "nothing was created" in err and "search --config" in err, err
    if "--config" in args and flag == "--tracking-uri" and "--storage" not in args:
        assert "workdir '.precision-search' of config" in err and str(project["config"]) in err, err
    assert _snapshot(project["tmp"]) == before


def test_ui_script_refuses_a_missing_store_and_names_it(project):
    env = dict(os.environ, PRECISION_SEARCH_CONFIG=str(project["config"]), MLFLOW_PORT="1",
               MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")), PYTHONPATH=str(ROOT))
    env.pop("PRECISION_SEARCH_WORKDIR", None)
    before = _snapshot(project["tmp"])
    done = subprocess.run(["bash", str(ROOT / "mlflow" / "ui.sh")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=project["elsewhere"])
    assert done.returncode == 2, done.stderr
    assert f"no MLflow store at {project['proj'] / '.precision-search' / 'mlflow.db'}" in done.stderr
    assert str(project["config"]) in done.stderr and "nothing was created" in done.stderr
    assert _snapshot(project["tmp"]) == before
