"""What travels to the workers: the user's package found and shipped, the reference bundle used as is.

The bundle test runs a real trial as a Ray task whose config names a model factory and data functions that
raise: it can only pass if the worker builds nothing itself and uses the driver's reference and datasets.
The re-measurement test does the same for the re-measurement after a search: its data functions work only
in the driver's process and the driver's workdir is gone before the Ray task runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.search import payload, ray_exec
from pipeline.search.worker import TrialOutcome, TrialTask
from tests.conftest import ROOT
from tests.pipeline.search.conftest import local_ray


def _forbidden(*args, **kwargs):
    raise AssertionError("a worker built the model or loaded data itself instead of using the driver's bundle")


forbidden_factory = forbidden_data = _forbidden
DRIVER_PID = "PS_TEST_DRIVER_PID"  # set in the driver after Ray started: no worker process has this pid


def _driver_only(name: str):
    def rows():
        if os.environ.get(DRIVER_PID) != str(os.getpid()):
            raise AssertionError("a Ray worker called the user's data function instead of using the driver's bundle")
        from pipeline.examples import digits

        return getattr(digits, name)()

    return rows


driver_only_calibration, driver_only_eval = _driver_only("mlp_calibration"), _driver_only("mlp_eval")


def _user_config(folder: Path, factory: str, data: str) -> dict:
    return {"name": "user-pkg", "model": {"framework": "torch", "factory": factory},
            "data": {"calibration": {"source": data}, "eval": {"source": data}}}


def test_user_code_ships_the_configs_own_package_found_next_to_the_config(tmp_path, monkeypatch):
    pkg = tmp_path / "acme_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def build():\n    return None\n")
    (tmp_path / "acme_data.py").write_text("def rows():\n    return None\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # user_code puts the config's folder on sys.path
    cfg = parse_config(_user_config(tmp_path, "acme_models:build", "acme_data:rows"), base_dir=tmp_path,
                       check_imports=False)
    shipped = payload.user_code(cfg)
    assert shipped == [str(pkg.resolve()), str((tmp_path / "acme_data.py").resolve())]
    assert str(tmp_path.resolve()) in sys.path  # the driver imports it from there too


def test_a_config_loads_with_its_module_beside_it_and_ships_it(tmp_path, monkeypatch):
    import yaml

    from pipeline.config import load_config

    (tmp_path / "beside_cfg.py").write_text("def build():\n    return None\n\ndef rows():\n    return None\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_user_config(tmp_path, "beside_cfg:build", "beside_cfg:rows")))
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = load_config(path)  # the import check finds beside_cfg in the config's folder
    assert payload.user_code(cfg) == [str((tmp_path / "beside_cfg.py").resolve())]


def test_a_config_loads_with_its_module_in_the_current_directory_and_ships_it(tmp_path, monkeypatch):
    """The installed command does not put the current directory on sys.path (``python`` does): the config
    load looks there after the config's folder, and a module found nowhere says where it looked."""
    import yaml

    from pipeline.config import load_config

    here, configs = tmp_path / "project", tmp_path / "configs"
    here.mkdir(), configs.mkdir()
    (here / "from_cwd_models.py").write_text("def build():\n    return None\n\ndef rows():\n    return None\n")
    path = configs / "cfg.yaml"
    path.write_text(yaml.safe_dump(_user_config(configs, "from_cwd_models:build", "from_cwd_models:rows")))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.chdir(tmp_path)  # not where the module is: refused, naming the places looked at
    with pytest.raises(ConfigError, match=r"model\.factory: cannot import module 'from_cwd_models': no such module "
                                          r"beside the config file, in the current directory or on PYTHONPATH"):
        load_config(path)
    monkeypatch.chdir(here)
    cfg = load_config(path)
    assert payload.user_code(cfg) == [str((here / "from_cwd_models.py").resolve())]


def test_user_code_leaves_out_the_project_and_installed_packages(tmp_path):
    cfg = parse_config(_user_config(tmp_path, "pipeline.examples.digits:mlp", "numpy:zeros"), base_dir=tmp_path,
                       check_imports=False)
    assert payload.user_code(cfg) == []
    assert all(Path(p).is_dir() for p in payload.project_code())


def test_materialize_writes_the_reference_once_per_node_cache(tmp_path, mlp_config):
    from pipeline.models import get_adapter

    ref = get_adapter(mlp_config).export_reference(mlp_config.work_path)
    bundle = payload.build_shared(mlp_config, ref)
    assert set(bundle.files) == {"reference.onnx"} and len(bundle.eval_set) > 0 and len(bundle.calibration) > 0
    local = payload.materialize(bundle, tmp_path / "node")
    assert Path(local.onnx_path).read_bytes() == Path(ref.onnx_path).read_bytes()
    assert Path(local.onnx_path).parent == tmp_path / "node" / "node-cache" / bundle.key
    assert local.layer_table == ref.layer_table
    mtime = Path(local.onnx_path).stat().st_mtime_ns
    assert payload.materialize(bundle, tmp_path / "node").onnx_path == local.onnx_path
    assert Path(local.onnx_path).stat().st_mtime_ns == mtime  # not rewritten


@pytest.fixture(scope="module")
def ray_one_cpu():
    with local_ray(1):
        yield


def test_a_trial_task_uses_the_drivers_bundle_and_records_where_it_ran(ray_one_cpu, make_config, tmp_path):
    import ray

    from pipeline.models import get_adapter
    from search_spaces.space import SearchSpace

    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"]})
    ref = get_adapter(cfg).export_reference(cfg.work_path)  # the driver's side
    shared = ray_exec.share(cfg, ref)
    plan = SearchSpace.build(cfg.search, ref.layer_table.names).plan_from_params(
        next(iter(SearchSpace.build(cfg.search, ref.layer_table.names).uniform_baselines().values())))
    # The worker's copy of the config names functions that raise, in a workdir of its own: only the bundle works.
    task_cfg = cfg.model_dump(mode="json")
    task_cfg["model"]["factory"] = "tests.pipeline.search.test_payload:forbidden_factory"
    for part in ("calibration", "eval", "train"):
        task_cfg["data"][part]["source"] = "tests.pipeline.search.test_payload:forbidden_data"
    task_cfg["workdir"] = str(tmp_path / "worker-work")
    res = ray_exec.Resources(cpus=1.0, gpus=0.0, capacity=1, where="test")
    task = TrialTask(study="bundle", number=0, config=task_cfg, base_dir=str(ROOT), cwd=str(tmp_path),
                     plan_yaml=plan.to_yaml(), out_dir=str(tmp_path / "trial"), energy=False)
    dispatcher = ray_exec.Dispatcher(res, shared)
    outcome = dispatcher.collect(dispatcher.submit(task, "bundle-trial-0"), 0, 0.0)
    assert outcome.status == "complete", outcome.reason
    assert outcome.node_id == ray.get_runtime_context().get_node_id() and outcome.node and outcome.attempt == 0
    assert outcome.placement() == {"node_id": outcome.node_id, "hostname": outcome.node, "ray_attempt": "0"}
    assert not (tmp_path / "worker-work" / cfg.name / "reference").exists()  # nothing re-exported there
    assert list((tmp_path / "worker-work" / cfg.name / "node-cache").glob("*/reference.onnx"))


def test_a_reference_that_cannot_be_scored_on_the_worker_is_the_studys_failure_not_the_plans(make_config, tmp_path):
    """Where the driver could not score the reference first (a backend it cannot run), the worker that cannot
    says so as a fatal outcome: the runner then stops asking for trials that would all fail alike."""
    from pipeline.plan import QuantPlan
    from pipeline.search.worker import TrialTask, run_trial

    cfg = make_config("digits_mlp.yaml", **{"metric.output": "no_such_output"})
    # run inline, the worker's chdir to the task's cwd is this process's: keep it where it is
    task = TrialTask(study="s", number=0, config=cfg.model_dump(mode="json"), base_dir=str(ROOT), cwd=os.getcwd(),
                     plan_yaml=QuantPlan.uniform("int8").to_yaml(), out_dir=str(tmp_path / "t"), energy=False)
    out = TrialOutcome.model_validate(run_trial(task))
    assert out.status == "fail" and out.fatal
    assert out.reason.startswith("the FP32 reference could not be scored: metric.name: accuracy raised")
    assert "metric.output 'no_such_output' is not a model output" in out.reason
    good = TrialTask(**{**task.model_dump(), "config": make_config("digits_mlp.yaml").model_dump(mode="json")})
    assert not TrialOutcome.model_validate(run_trial(good)).fatal


def test_an_outcome_that_never_reached_a_worker_has_no_placement():
    assert TrialOutcome(number=1, status="fail", reason="the Ray task failed").placement() == {}


def test_the_remeasurement_on_a_worker_uses_the_bundle_not_the_drivers_files(ray_one_cpu, make_config, tmp_path,
                                                                             monkeypatch):
    import ray

    from pipeline.evaluation import Evaluator
    from pipeline.search import remeasure
    from search_spaces.space import SearchSpace

    monkeypatch.setenv(DRIVER_PID, str(os.getpid()))
    here = "tests.pipeline.search.test_payload"
    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"], "search.int8_activations": ["dynamic"],
                                            "measure.remeasure_rounds": 2,
                                            "data.calibration.source": f"{here}:driver_only_calibration",
                                            "data.eval.source": f"{here}:driver_only_eval"})
    ev = Evaluator(cfg)  # the driver: builds the reference and the candidates with its own data functions
    space = SearchSpace.build(cfg.search, ev.reference.layer_table.names)
    variants = []
    for i, (label, params) in enumerate(space.uniform_baselines().items()):
        artifact = ev.quantize(space.plan_from_params(params), tmp_path / "artifacts" / label)[0]
        variants.append(remeasure.Variant(str(i), label, str(artifact)))
    shared = ray_exec.share(cfg, ev.reference)
    assert ray_exec.shared_for(cfg) is shared
    # The driver's workdir is gone, and a file stands where it was: no worker can read or recreate it.
    shutil.rmtree(cfg.work_path.parent)
    cfg.work_path.parent.write_text("not a folder")
    job = {"config": cfg.model_dump(mode="json"), "base_dir": str(cfg.base_dir.resolve()), "cwd": str(tmp_path),
           "variants": [v.__dict__ for v in variants], "threads": 1, "energy_source": "none"}
    report = remeasure.RemeasureReport.model_validate(remeasure._run(job, {"ort-cpu"}, cfg))
    assert not report.error and report.backend == "ort-cpu" and report.rounds == 2
    # the runtime's one-liner is built there too, from the bundle's reference graph
    assert [p.error for p in report.peers] == [""]
    assert set(report.variants) == {v.key for v in variants}
    assert report.peers[0].stats.latency_ms_p50 > 0
    for stats in report.variants.values():
        assert not stats.error and stats.latency_ms_p50 > 0 and len(stats.round_medians) == 2
    with pytest.raises(ray.exceptions.RayTaskError):  # the control: without the bundle the worker needs the driver's data
        remeasure._run(job, {"ort-cpu"}, None)
