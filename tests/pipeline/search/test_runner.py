"""End-to-end searches with real Optuna (SQLite), Ray (local, 2 CPUs) and MLflow (SQLite).

Each search quantizes and measures real candidates of the digits MLP; measurement
settings are cut down by the shared conftest (few timing runs, short energy window).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import mlflow
import optuna
import pytest

from pipeline.tracking import schema as S
from pipeline.config import ConfigError
from pipeline.tracking.search import run_search
from pipeline.objectives import objective_infos
from pipeline.search.records import TrialRecord, build_records, front_summary, hypervolume_box, study_objectives
from pipeline.search.runner import SearchOptions
from pipeline.search import ray_exec
from pipeline.search.storage import config_hash, make_sampler, open_study
from tests.conftest import ROOT
from tests.pipeline.search.conftest import local_ray



@pytest.fixture(scope="module")
def flaky_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flaky")


@pytest.fixture(scope="module")
def ray_local(flaky_dir):
    """One local Ray for the module; workers can import tests.* and find the flaky metric's folder."""
    with local_ray(2, FLAKY_METRIC_DIR=str(flaky_dir)):
        yield


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One MLflow SQLite store for the module's searches (its migrations take seconds to create)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRECISION_SEARCH_STORAGE", raising=False)


def _dominates(a, b, dirs):
    better_or_equal = all((x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, dirs))
    strictly = any((x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, dirs))
    return better_or_equal and strictly


@pytest.mark.slow
def test_twelve_trial_search_front_and_mlflow_record(ray_local, mlflow_uri, make_config, capsys):
    cfg = make_config("digits_mlp.yaml", **{"search.trials": 12})
    summary = run_search(cfg, SearchOptions(trials=12, parallel=2, progress="off", tracking_uri=mlflow_uri))

    # -- Optuna: 12 finished trials, the five uniform baselines first -------------------------
    study = optuna.load_study(study_name=cfg.name, storage=summary.storage)
    assert summary.storage == f"sqlite:///{cfg.work_path.resolve()}/optuna.db"
    assert summary.tracking_uri == mlflow_uri
    trials = study.get_trials()
    assert len(trials) == 12
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    labels = {t.user_attrs.get("baseline") for t in trials} - {None}
    # One INT8 baseline per allowed activation mode; bf16/fp8 are only emulated on ORT CPU, where native int8 is
    # as small, so the search leaves them out (search.include_emulated: true brings them back).
    assert labels == {"uniform-fp32", "uniform-int8", "uniform-int8-dynamic", "uniform-int4"}
    summaries = [t.user_attrs.get("plan_summary", "") for t in trials]
    assert all(s and "bf16" not in s and "fp8" not in s for s in summaries), summaries
    assert summary.trials_complete + summary.trials_failed == 12
    for t in trials:
        if t.state.name == "FAIL":
            assert t.user_attrs["fail_reason"]  # every failure says why
    fp32 = next(t for t in trials if t.user_attrs.get("baseline") == "uniform-fp32")
    assert fp32.state.name == "COMPLETE"
    # the constraint is an Optuna constraint (drop - limit), not folded into the objectives
    drop = fp32.user_attrs["result"]["measurement"]["accuracy_drop"]
    assert fp32.constraints == {"accuracy_drop": pytest.approx(drop - cfg.search.max_accuracy_drop)}
    assert fp32.values[0] == pytest.approx(fp32.user_attrs["result"]["measurement"]["accuracy"])
    assert study.user_attrs["energy_objective"] in ("energy", "latency")

    # -- the front: non-empty, feasible, non-dominated, and it covers every feasible trial ----
    infos = summary.objectives
    dirs = [o.direction for o in infos]
    front = summary.front
    assert front
    assert {r.number for r in front} == {t.number for t in study.best_trials}
    vec = {t.number: t.values for t in trials if t.state.name == "COMPLETE"}
    feasible = [n for n in vec if all(v <= 0 for v in study.trials[n].constraints.values())]
    for a, b in itertools.permutations([r.number for r in front], 2):
        assert not _dominates(vec[a], vec[b], dirs)
    for n in set(feasible) - {r.number for r in front}:
        assert any(_dominates(vec[r.number], vec[n], dirs) for r in front)
    assert sum(r.knee for r in front) == 1
    assert summary.hypervolume is not None and summary.hypervolume >= 0

    # -- MLflow: 1 parent + 12 children with the schema's tags --------------------------------
    client = mlflow.MlflowClient(summary.tracking_uri)
    runs = client.search_runs([summary.experiment_id], filter_string=f"tags.`{S.TAG_STUDY}` = '{cfg.name}'")
    parents = [r for r in runs if r.data.tags.get(S.TAG_ROLE) == S.ROLE_STUDY]
    children = [r for r in runs if r.data.tags.get(S.TAG_ROLE) == S.ROLE_TRIAL]
    assert len(parents) == 1 and len(children) == 12
    parent = parents[0]
    assert parent.info.run_id == summary.parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["front_size"] == len(front)
    assert parent.data.metrics["trials_complete"] == summary.trials_complete
    assert parent.data.tags["precision_search.energy_objective"] == study.user_attrs["energy_objective"]
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["objectives"] == "accuracy,energy,size"
    pareto = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert {S.ARTIFACT_FRONT_TABLE, S.ARTIFACT_FRONT_PLOT_PNG, S.ARTIFACT_FRONT_PLOT_SVG} <= pareto
    front_numbers = {r.number for r in front}
    by_number = {int(r.data.tags[S.TAG_TRIAL_NUMBER]): r for r in children}
    assert set(by_number) == {t.number for t in trials}
    for t in trials:
        run = by_number[t.number]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags[S.TAG_STATE] == t.state.name
        assert tags[S.TAG_METHOD] == "ptq"
        assert tags.get(S.TAG_BASELINE) == t.user_attrs.get("baseline")
        assert any(k.startswith("layer.") for k in run.data.params)
        if t.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert tags[S.TAG_PARETO] == ("true" if t.number in front_numbers else "false")
            for key in (S.TAG_BACKEND, S.TAG_DEVICE, S.TAG_ENERGY_SOURCE, S.TAG_EXECUTION):
                assert tags[key]
            assert run.data.metrics["accuracy"] == pytest.approx(t.values[0])
            assert tags["precision_search.model_uri"].startswith("models:/")
            assert {S.ARTIFACT_PLAN, S.ARTIFACT_RESULT} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        else:
            assert run.info.status == "FAILED" and tags[S.TAG_FAIL_REASON]

    # -- `front` reads the same front back from the study ---------------------------------------
    from pipeline.cli import main

    capsys.readouterr()
    rc = main(["front", "--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--storage", summary.storage,
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["number"] for r in out["rows"]} == front_numbers
    assert all(r["run_id"] for r in out["rows"])
    assert out["eval_batch_size"] == cfg.measure.eval_batch and out["timing_batch_size"] == cfg.measure.batch_size

    # -- running it again with the same target does nothing new (resume is idempotent) ---------
    again = run_search(cfg, SearchOptions(trials=12, parallel=2, progress="off", tracking_uri=mlflow_uri))
    assert len(optuna.load_study(study_name=cfg.name, storage=summary.storage).trials) == 12
    assert again.parent_run_id == summary.parent_run_id


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_study_completes(ray_local, mlflow_uri, make_config, flaky_dir):
    # metric calls: 1 = trial 0 accuracy, 2 = reference accuracy (then cached on disk),
    # 3 = trial 1 (raises), 4 = trial 2 (NaN), 5-7 = trial 3 (its worker dies on every attempt: Ray's
    # MAX_RETRIES system-failure retries, then FAIL; its plan is re-queued), 8 = trial 4 (its worker dies
    # once), 9 = trial 4 re-run by Ray, 10 = trial 5.
    assert ray_exec.MAX_RETRIES == 2
    (flaky_dir / "fail_at").write_text(json.dumps({"3": "raise", "4": "nan", "5": "exit", "6": "exit", "7": "exit",
                                                   "8": "exit"}))
    cfg = make_config("digits_mlp.yaml", **{
        "metric": {"name": "tests.pipeline.flaky_metric:accuracy", "higher_is_better": True},
        "search.formats": ["fp32", "int8"], "search.trials": 5,
    })
    summary = run_search(cfg, SearchOptions(study="flaky", parallel=1, progress="off", tracking_uri=mlflow_uri))
    # the dead worker fails its trial, not its plan: the plan is retried (and the dead trial not counted)
    assert summary.trials_complete == 3 and summary.trials_failed == 2 and summary.trials_retried == 1
    study = open_study(cfg, "flaky")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "FAIL", 4: "COMPLETE", 5: "COMPLETE"}
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 3)
    assert retry.params == study.trials[3].params and study.trials[3].user_attrs["system_retried"]
    reasons = {t.number: t.user_attrs["fail_reason"] for t in study.trials if t.state.name == "FAIL"}
    assert "injected failure on metric call 3" in reasons[1]
    assert "not finite" in reasons[2]
    assert "Ray task failed" in reasons[3]
    assert study.trials[4].user_attrs["ray_attempt"] == "1"  # re-run by Ray after its worker died
    assert study.trials[0].user_attrs["ray_attempt"] == "0" and study.trials[0].user_attrs["node_id"]
    client = mlflow.MlflowClient(summary.tracking_uri)
    for number, reason in reasons.items():
        run = client.get_run(study.trials[number].user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags[S.TAG_STATE] == "FAIL"
        assert run.data.tags[S.TAG_FAIL_REASON] == reason[:5000]
    records = build_records(study, study_objectives(study))
    assert {r.number for r in records if r.on_front} <= {0, 4, 5}
    assert any(r.on_front for r in records)


# -- pure parts: objectives, hypervolume box, config identity ------------------------------------
def _rec(n, acc, cost, size, baseline=None, state="COMPLETE", feasible=True):
    return TrialRecord(number=n, state=state, baseline=baseline, feasible=feasible,
                       values={} if state != "COMPLETE" else {"accuracy": acc, "energy": cost, "size": size})


def test_hypervolume_box_waits_for_the_baselines_then_spans_them():
    infos = objective_infos(["accuracy", "energy", "size"], "accuracy", True, "latency")
    records = [_rec(0, 0.97, 1.0, 400.0, "uniform-fp32"), _rec(1, 0.96, 3.0, 100.0, "uniform-int8"),
               _rec(2, 0.0, 0.0, 0.0, "uniform-int4", state="RUNNING")]
    assert hypervolume_box(records, infos, 0.97, 0.05) is None
    records[2] = _rec(2, 0.5, 0.5, 50.0, "uniform-int4", state="FAIL")
    box = hypervolume_box(records, infos, 0.97, 0.05)
    assert box["ideal"] == [0.97, 0.0, 0.0]
    assert box["reference"] == [pytest.approx(0.92), 3.0, 400.0]  # drop limit; worst baseline costs
    # hypervolume: the int8 point (0.96, 3.0, 100) sits on the box's cost edge, fp32 on its size edge: 0.
    # A point at (0.97, 1.5, 200) dominates 1.0 * 0.5 * 0.5 of the normalised box.
    records.append(_rec(3, 0.97, 1.5, 200.0))
    summary = front_summary(records, infos, box)
    assert summary["hypervolume"] == pytest.approx(0.25)
    assert summary["trials_complete"] == 3 and summary["trials_failed"] == 1
    # infeasible trials do not count
    records[3].feasible = False
    assert front_summary(records, infos, box)["hypervolume"] == 0.0
    assert "hypervolume" not in front_summary(records, infos, None)


def test_config_identity_ignores_trial_count_tracking_and_workdir(make_config):
    a = make_config("digits_mlp.yaml")
    b = make_config("digits_mlp.yaml", **{"search.trials": 99, "tracking.experiment": "x"})
    b.workdir = "/somewhere/else"
    c = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"]})
    d = make_config("digits_mlp.yaml", **{"measure.batch_size": 8})
    assert config_hash(a) == config_hash(b)
    assert len({config_hash(a), config_hash(c), config_hash(d)}) == 3


def test_resumed_samplers_do_not_replay_the_first_session(make_config):
    cfg = make_config("digits_mlp.yaml", **{"search.sampler": "random"})
    draws = []
    for offset in (0, 0, 7):
        study = optuna.create_study(sampler=make_sampler(cfg, offset))
        draws.append(study.ask().suggest_float("x", 0, 1))
    assert draws[0] == draws[1] != draws[2]
    for name in ("tpe", "nsga2"):
        assert make_sampler(make_config("digits_mlp.yaml", **{"search.sampler": name}))


def test_open_study_names_the_missing_study(make_config):
    cfg = make_config("digits_mlp.yaml")
    with pytest.raises(ConfigError, match="no study 'nope'"):
        open_study(cfg, "nope")
    with pytest.raises(ConfigError, match="not a valid study name"):
        open_study(cfg, "bad name!")


def test_a_changed_config_does_not_resume_an_old_study(mlp_config):
    from pipeline.search.storage import default_storage

    old = optuna.create_study(study_name="changed-config", storage=default_storage(mlp_config),
                              directions=["maximize"] * 3)
    old.set_user_attr("config_hash", "0123456789abcdef")
    with pytest.raises(ConfigError, match="created from a different config"):
        run_search(mlp_config, SearchOptions(study="changed-config", progress="off"))


def test_a_changed_config_is_refused_before_the_sensitivity_table_is_measured(make_config, capsys):
    """The refusal reads the stored study first: a seeded search does not spend the table's minutes on it."""
    from pipeline.search.storage import default_storage

    cfg = make_config("digits_mlp.yaml", **{"search.sensitivity.seed": True})
    old = optuna.create_study(study_name="changed-seeded", storage=default_storage(cfg), directions=["maximize"] * 3)
    old.set_user_attr("config_hash", "0123456789abcdef")
    with pytest.raises(ConfigError, match="created from a different config"):
        run_search(cfg, SearchOptions(study="changed-seeded", progress="lines"))
    assert "sensitivity" not in capsys.readouterr().out
    assert not list(cfg.work_path.rglob("sensitivity*"))


def _node(cpus, gpus=0, alive=True):
    res = {"CPU": float(cpus)}
    if gpus:
        res["GPU"] = float(gpus)
    return {"Alive": alive, "Resources": res}


def test_resources_per_trial_follow_backend_threads_and_parallel(make_config):
    from pipeline.search.ray_exec import plan_resources

    cpu = make_config("digits_mlp.yaml")  # backend auto, threads 0
    one_node = [_node(2)]
    r = plan_resources(cpu, None, {"CPU": 2.0}, one_node)
    assert (r.cpus, r.gpus, r.capacity) == (2.0, 0.0, 1)  # all cores, timed alone
    r = plan_resources(cpu, 2, {"CPU": 2.0}, one_node)
    assert (r.cpus, r.capacity) == (1.0, 2)  # --parallel 2 splits the cores
    r = plan_resources(make_config("digits_mlp.yaml", **{"measure.threads": 1}), None, {"CPU": 6.0},
                       [_node(2), _node(4), _node(8, alive=False)])
    assert (r.cpus, r.capacity) == (1.0, 6)
    # a GPU cluster: one GPU per trial, as many in flight as there are GPUs
    r = plan_resources(cpu, None, {"CPU": 32.0, "GPU": 4.0}, [_node(16, 2), _node(16, 2)])
    assert (r.gpus, r.cpus, r.capacity) == (1.0, 1.0, 4)
    with pytest.raises(ConfigError, match="needs a GPU"):
        plan_resources(make_config("digits_mlp.yaml", **{"measure.backend": "ort-cuda"}), None, {"CPU": 2.0},
                       one_node)


# -- one energy source per study: the meter is pinned after the first trial --------------------
def _children(summary, study_name):
    client = mlflow.MlflowClient(summary.tracking_uri)
    runs = client.search_runs([summary.experiment_id], filter_string=f"tags.`{S.TAG_STUDY}` = '{study_name}'")
    parent = next(r for r in runs if r.data.tags.get(S.TAG_ROLE) == S.ROLE_STUDY)
    return parent, [r for r in runs if r.data.tags.get(S.TAG_ROLE) == S.ROLE_TRIAL]


@pytest.mark.slow
def test_a_resume_logs_no_run_for_a_proposal_the_sensitivity_screen_skipped(ray_local, mlflow_uri, make_config):
    """A proposal skipped at proposal time (PRUNED, never measured) has no MLflow run; a resume's reconciliation
    must not back-fill one as a FAILED run (it did: every skipped proposal of the first session became one)."""
    from pipeline.search.storage import T_FAIL_REASON

    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"], "search.int8_activations": ["dynamic"],
                                            "search.calibrations": ["minmax"], "search.trials": 2})
    opts = SearchOptions(study="skipped", parallel=1, progress="off", tracking_uri=mlflow_uri)
    summary = run_search(cfg, opts)
    study = open_study(cfg, "skipped")
    trial = study.ask()  # as the runner records a skipped proposal
    trial.set_user_attr(T_FAIL_REASON, "skipped: predicted accuracy drop 0.9 exceeds 2 x search.max_accuracy_drop")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    again = run_search(cfg, dataclasses.replace(opts, trials=3))
    _, children = _children(again, "skipped")
    numbers = sorted(int(r.data.tags[S.TAG_TRIAL_NUMBER]) for r in children)
    assert trial.number not in numbers
    assert len(numbers) == len(set(numbers)) == again.trials_complete + again.trials_failed
    assert summary.parent_run_id == again.parent_run_id


@pytest.mark.slow
def test_a_qat_trial_logs_its_loss_curve_as_a_stepped_metric(ray_local, mlflow_uri, make_config):
    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"], "search.int8_activations": ["dynamic"],
                                            "search.calibrations": ["minmax"], "search.methods": ["qat"],
                                            "search.qat_steps": [12], "search.baselines": False,
                                            "search.trials": 1})
    summary = run_search(cfg, SearchOptions(study="qat-curve", parallel=1, progress="off", tracking_uri=mlflow_uri))
    assert summary.trials_complete == 1
    _, (child,) = _children(summary, "qat-curve")
    history = mlflow.MlflowClient(summary.tracking_uri).get_metric_history(child.info.run_id, S.METRIC_QAT_LOSS)
    (t,) = open_study(cfg, "qat-curve").get_trials()
    curve = t.user_attrs["result"]["qat_curve"]
    assert len(curve) == 12 and [m.step for m in history] == list(range(12))
    assert [m.value for m in history] == pytest.approx(curve)


@pytest.mark.slow
def test_energy_meter_is_pinned_to_the_first_trials_source(ray_local, mlflow_uri, make_config):
    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"], "search.int8_activations": ["dynamic"],
                                            "search.calibrations": ["minmax"], "search.trials": 3})
    summary = run_search(cfg, SearchOptions(study="pinned", parallel=1, progress="off", tracking_uri=mlflow_uri))
    study = open_study(cfg, "pinned")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    energy = [t.user_attrs["result"]["measurement"]["energy"] for t in trials]
    source = energy[0]["source"]
    assert source in ("nvml", "rapl", "estimated")
    assert study.user_attrs["energy_source"] == source
    assert study.user_attrs["energy_meter_pinned"]["meter"] == source
    assert "trial 0" in study.user_attrs["energy_meter_pinned"]["by"]
    assert all(e["source"] == source for e in energy)
    if source == "estimated":
        # trial 0 ran with meter "auto" (the estimate says why it fell back); later trials with the pinned
        # explicit meter, which has no fallback note and would have failed rather than switch source
        assert "auto: " in energy[0]["meter"]
        assert not any("auto: " in e["meter"] for e in energy[1:])
    assert summary.energy_meter_pinned == source
    parent, _ = _children(summary, "pinned")
    assert parent.data.tags[S.TAG_ENERGY_METER_PINNED] == source
    assert parent.data.tags[S.TAG_ENERGY_SOURCE] == source
    assert "pinned by trial 0" in parent.data.tags[S.TAG_ENERGY_PIN_NOTE]


@pytest.mark.slow
def test_an_explicit_meter_pins_the_study_from_the_start(ray_local, mlflow_uri, make_config):
    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32"], "search.trials": 1,
                                            "measure.energy.meter": "estimated"})
    summary = run_search(cfg, SearchOptions(study="explicit-meter", parallel=1, progress="off",
                                            tracking_uri=mlflow_uri))
    assert summary.trials_complete == 1 and summary.energy_meter_pinned == "estimated"
    study = open_study(cfg, "explicit-meter")
    assert study.user_attrs["energy_meter_pinned"] == {"meter": "estimated",
                                                       "by": "measure.energy.meter in the config"}
    parent, _ = _children(summary, "explicit-meter")
    assert parent.data.tags[S.TAG_ENERGY_METER_PINNED] == "estimated"


def _nvml_available() -> bool:
    from pipeline.energy.base import MeterUnavailable
    from pipeline.energy.nvml import NvmlMeter

    try:
        NvmlMeter(0)
    except MeterUnavailable:
        return False
    return True


@pytest.mark.slow
def test_a_pinned_meter_missing_on_the_worker_fails_the_trial_instead_of_switching(ray_local, mlflow_uri, make_config):
    if _nvml_available():
        pytest.skip("NVML works here: a study pinned to it would measure normally")
    from pipeline.search.storage import default_storage

    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32"], "search.trials": 1})
    # a study that a GPU node pinned to NVML, resumed on a node without NVML
    old = optuna.create_study(study_name="pinned-nvml", storage=default_storage(cfg), directions=["maximize"] + ["minimize"] * 2)
    old.set_user_attr("energy_source", "nvml")
    old.set_user_attr("energy_meter_pinned", {"meter": "nvml", "by": "trial 0, the first to finish"})
    summary = run_search(cfg, SearchOptions(study="pinned-nvml", parallel=1, progress="off", tracking_uri=mlflow_uri))
    assert summary.trials_complete == 0 and summary.trials_failed == 1
    (t,) = open_study(cfg, "pinned-nvml").get_trials()
    reason = t.user_attrs["fail_reason"]
    assert "MeterUnavailable" in reason and "'nvml'" in reason  # the meter's own reason, not an estimate
    assert "pinned to nvml by trial 0" in reason
    parent, children = _children(summary, "pinned-nvml")
    assert parent.data.tags[S.TAG_ENERGY_METER_PINNED] == "nvml"
    assert children[0].data.tags[S.TAG_FAIL_REASON] == reason[:5000]


# -- duplicate proposals -------------------------------------------------------------------------
def test_plan_key_ignores_knobs_that_do_not_change_the_artifact():
    from pipeline.plan import QuantPlan
    from pipeline.search.plans import plan_key

    names = ["fc1", "fc2"]
    fp32 = QuantPlan(layers={"fc1": "fp32", "fc2": "fp32"})
    assert plan_key(fp32, names) == plan_key(QuantPlan(layers={"*": "fp32"}, int8_activations="dynamic",
                                                       int4_block_size=64, calibration="percentile"), names)
    int8 = QuantPlan(layers={"fc1": "int8", "*": "fp32"})
    assert plan_key(int8, names) != plan_key(fp32, names)
    assert plan_key(int8, names) != plan_key(QuantPlan(layers={"fc1": "int8", "*": "fp32"},
                                                        int8_activations="dynamic"), names)
    # static int8 is calibrated: the calibrator matters; dynamic int8 is not: it does not
    assert plan_key(int8, names) != plan_key(QuantPlan(layers={"fc1": "int8", "*": "fp32"},
                                                        calibration="percentile"), names)
    dyn = dict(layers={"fc1": "int8", "*": "fp32"}, int8_activations="dynamic")
    assert plan_key(QuantPlan(**dyn), names) == plan_key(QuantPlan(**dyn, calibration="percentile"), names)
    assert plan_key(QuantPlan(**dyn), names) != plan_key(QuantPlan(**dyn, method="qat"), names)


def test_layer_tags_use_the_plan_summarys_notation():
    from pipeline.plan import QuantPlan
    from pipeline.search.plans import layer_tags

    names = ["fc1", "block 2.fc", "fc3"]  # a layer name may hold a space; a tag never does
    plan = QuantPlan(layers={"fc1": "int8", "block 2.fc": "int4", "*": "fp32"}, int8_activations="dynamic",
                     int4_block_size=64)
    assert layer_tags(plan, names) == {"fc1": "int8(dyn)", "block 2.fc": "int4(b64)", "fc3": "fp32"}
    assert " ".join(f"{n}={t}" for n, t in layer_tags(plan, names).items()) == plan.summary(names)


@pytest.mark.slow
def test_duplicate_proposals_reuse_the_measured_trial_and_the_search_stops_when_only_duplicates_come(
        ray_local, mlflow_uri, make_config):
    # One format: every plan the sampler can propose is the FP32 baseline's plan.
    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32"], "search.trials": 3})
    opts = SearchOptions(study="dups", parallel=1, progress="off", tracking_uri=mlflow_uri,
                         max_consecutive_duplicates=4)
    summary = run_search(cfg, opts)
    assert summary.trials_complete == 1 and summary.trials_failed == 0
    assert summary.trials_duplicate == 4
    assert "4 plans in a row" in summary.stopped_early and "1 measured trial(s) of the 3" in summary.stopped_early
    study = open_study(cfg, "dups")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert len(trials) == 5
    original, dups = trials[0], trials[1:]
    assert original.user_attrs["baseline"] == "uniform-fp32" and "duplicate_of" not in original.user_attrs
    for t in dups:
        assert t.state.name == "COMPLETE"
        assert t.user_attrs["duplicate_of"] == 0
        assert t.values == original.values and t.constraints == original.constraints
    assert [r.number for r in summary.front] == [0]  # the duplicates never join the front themselves
    parent, children = _children(summary, "dups")
    assert len(children) == 1  # no child run for a plan that was not measured again
    assert children[0].data.tags[S.TAG_DUPLICATES] == "1,2,3,4"
    assert parent.data.metrics["trials_duplicate"] == 4
    assert S.TAG_STOPPED_EARLY in parent.data.tags

    # resume: still one measured trial, the duplicates stay without runs, the budget is not consumed by them
    again = run_search(cfg, opts)
    assert again.trials_complete == 1 and again.trials_duplicate == 8
    _, children = _children(again, "dups")
    assert len(children) == 1 and children[0].data.tags[S.TAG_DUPLICATES] == "1,2,3,4,5,6,7,8"


@pytest.mark.slow
def test_search_json_output_is_one_json_document(ray_local, mlflow_uri, tmp_path, capsys):
    """stdout holds the summary only; what libraries print meanwhile (MLflow's "View run" links over
    http, covered by tests/test_mlflow_server.py) is routed to stderr."""
    import sys

    from pipeline.cli import main
    from pipeline.cli.search import stdout_to_stderr

    capsys.readouterr()
    rc = main(["search", "--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--trials", "1",
               "--study", "cli-json", "--tracking-uri", mlflow_uri, "--json",
               "--set", f"workdir={tmp_path / 'work'}", "--set", "search.formats=[fp32]",
               "--set", "measure.runs=5", "--set", "measure.warmup=1",
               "--set", "measure.energy.min_seconds=0.05", "--set", "measure.energy.repeats=1"])
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # the whole of stdout parses
    assert out["study"] == "cli-json" and out["trials_complete"] == 1
    with stdout_to_stderr(True):
        sys.stdout.write("🏃 View run trial-000 at: http://127.0.0.1:5000/#/experiments/1/runs/x\n")
    captured = capsys.readouterr()
    assert captured.out == "" and "View run trial-000" in captured.err


@pytest.mark.slow
def test_the_printed_promote_command_runs_as_printed_and_the_hypervolume_says_it_is_remeasured(
        ray_local, mlflow_uri, tmp_path, capsys):
    import shlex

    from pipeline.cli import main

    base = ["--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--tracking-uri", mlflow_uri,
            "--set", f"workdir={tmp_path / 'work'}", "--set", "search.formats=[fp32,int8]",
            "--set", "measure.runs=6", "--set", "measure.warmup=1", "--set", "measure.remeasure_rounds=2",
            "--set", "measure.energy.min_seconds=0.05", "--set", "measure.energy.repeats=1"]
    capsys.readouterr()
    assert main(["search", *base, "--trials", "3", "--study", "printed", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # after the re-measurement the hypervolume is taken on its numbers, and says so, with the in-search one
    assert re.search(r"hypervolume \d\.\d{4} on the re-measured timings \(\d\.\d{4} on the in-search ones\)", out)
    # both follow-up commands run exactly as printed: they carry the --set overrides (the workdir moves every store)
    for hint, verb in (("list it again:", "front"), ("promote the knee:", "promote")):
        line = next(ln for ln in out.splitlines() if hint in ln)
        argv = shlex.split(line.split(hint, 1)[1])
        assert Path(argv[0]).name == "precision-search" and argv[1] == verb
        assert f"workdir={tmp_path / 'work'}" in argv
        assert main(argv[1:]) == 0, capsys.readouterr()
    assert "registered" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_a_time_budget_stops_proposing_finishes_in_flight_trials_and_keeps_the_front(
        ray_local, mlflow_uri, make_config, capsys):
    from pipeline.search.storage import study_counts

    cfg = make_config("digits_mlp.yaml", **{"search.trials": 12})
    opts = SearchOptions(study="budget", parallel=2, progress="lines", tracking_uri=mlflow_uri, time_budget_s=1.0)
    summary = run_search(cfg, opts)
    out = capsys.readouterr().out
    assert "time budget of 1s is spent" in summary.stopped_early
    study = open_study(cfg, "budget")
    counts = study_counts(study)
    assert counts.running == 0  # what was in flight when the budget ran out finished
    assert 1 <= counts.measured < 12
    assert (summary.trials_complete, summary.trials_failed) == (counts.complete, counts.failed)
    feasible_best = {t.number for t in study.best_trials}
    assert summary.front and {r.number for r in summary.front} == feasible_best
    parent, _ = _children(summary, "budget")
    assert "time budget" in parent.data.tags[S.TAG_STOPPED_EARLY]
    # the counter is the storage's: never past its target, never backwards
    counters = [(int(d), int(t)) for d, t in re.findall(r"\[(\d+)/(\d+)\] trial", out)]
    assert counters and all(t == 12 for _, t in counters)
    assert [d for d, _ in counters] == sorted(d for d, _ in counters) and counters[-1][0] == counts.measured

    # resumed without a budget for one more trial: the counter starts from what the storage holds
    more = SearchOptions(study="budget", trials=counts.measured + 1, parallel=1, progress="lines",
                         tracking_uri=mlflow_uri)
    again = run_search(cfg, more)
    out = capsys.readouterr().out
    counters = [(int(d), int(t)) for d, t in re.findall(r"\[(\d+)/(\d+)\] trial", out)]
    assert counters == [(counts.measured + 1, counts.measured + 1)]
    assert not again.stopped_early and again.trials_complete + again.trials_failed == counts.measured + 1


@pytest.mark.slow
def test_the_runner_needs_no_mlflow(ray_local, make_config):
    """pipeline.search on its own (no recorder handed in): the study runs, nothing is written to MLflow."""
    from pipeline.search.runner import run_search as run_study

    cfg = make_config("digits_mlp.yaml", **{"search.formats": ["fp32", "int8"], "search.trials": 2})
    summary = run_study(cfg, SearchOptions(study="no-mlflow", parallel=2, progress="off"))
    assert summary.trials_complete == 2 and summary.front
    assert summary.parent_run_id == "" and not summary.tracking_errors
    assert not list(cfg.work_path.resolve().parent.rglob("mlflow.db"))
    assert open_study(cfg, "no-mlflow").user_attrs["mlflow_parent_run_id"] == ""


@pytest.mark.slow
def test_the_default_search_is_seeded_when_the_table_is_cheap_and_reads_it_from_the_cache_on_resume(
        ray_local, mlflow_uri, make_config, capsys):
    from pipeline.search.storage import T_SEED

    # search.sensitivity.seed: auto (the default; the shared test config turns it off): 4 layers x {int8, int4}
    # = 8 single-layer candidates, no more than the 10 trials, so the table is measured and seeds the study
    cfg = make_config("digits_mlp.yaml", **{"search.trials": 10, "search.sensitivity.seed": "auto",
                                            "search.sensitivity.eval_limit": 200, "measure.remeasure_rounds": 3})
    summary = run_search(cfg, SearchOptions(study="auto-seed", parallel=2, progress="lines", tracking_uri=mlflow_uri))
    out = capsys.readouterr().out
    assert "measuring the sensitivity table (8 single-layer candidates" in out and "sensitivity 8/8" in out
    assert "sensitivity table: 2 candidates at a time on Ray" in out  # on the search's workers, not the driver
    assert summary.seeding.startswith("seeded: ") and "8 cells" in summary.seeding
    parent, _ = _children(summary, "auto-seed")
    assert parent.data.tags[S.TAG_SEEDING] == summary.seeding  # the MLflow study run says it too
    study = open_study(cfg, "auto-seed")
    # 4 baselines, then seeds up to the 10 trials (the rest wait for a resumed search), all measured; with 2
    # workers one TPE proposal may start while the last baseline runs (the seeds wait for it)
    seeded = [t for t in study.get_trials() if t.user_attrs.get(T_SEED)]
    ran = [t for t in seeded if t.state is not optuna.trial.TrialState.WAITING]
    assert len(ran) >= min(5, len(seeded)) and all(t.state is optuna.trial.TrialState.COMPLETE for t in ran)
    seeded = ran
    # the seeds' INT8 layers run in the activation mode of the faster uniform INT8 baseline, measured first
    from pipeline.results import TrialResult
    from pipeline.search.storage import T_BASELINE, T_RESULT

    int8 = {t.user_attrs[T_BASELINE]: t for t in study.get_trials() if t.user_attrs.get(T_BASELINE, "").startswith(
        "uniform-int8")}
    assert set(int8) == {"uniform-int8", "uniform-int8-dynamic"}
    # ... timed again, interleaved, before the seeds were solved (their in-search p50s ran at different moments)
    from pipeline.search.storage import A_BASELINE_RETIMING

    retimed = study.user_attrs[A_BASELINE_RETIMING]
    assert not retimed["error"] and retimed["method"].startswith("re-measured interleaved, 3 rounds")
    assert set(retimed["latency_ms"]) == {t.user_attrs[T_BASELINE] for t in study.get_trials()
                                          if t.user_attrs.get(T_BASELINE)}
    assert "seeds: " in out and "baselines re-measured interleaved, 3 rounds" in out
    timed = sorted((TrialResult.model_validate(t.user_attrs[T_RESULT]).measurement.accuracy_drop > 0.03,
                    retimed["latency_ms"][label], label) for label, t in int8.items())
    fastest = "dynamic" if timed[0][2].endswith("dynamic") else "static"
    with_int8 = [t for t in seeded if "int8_activations" in t.params]  # a plan without INT8 layers has no such knob
    assert with_int8 and all(t.params["int8_activations"] == fastest for t in with_int8)
    # ... and wait for every uniform baseline: the speed-aware seeds weigh formats by their measured latency
    baselines = [t for t in study.get_trials() if t.user_attrs.get(T_BASELINE)]
    assert len(baselines) == 4 and min(t.datetime_start for t in seeded) >= max(t.datetime_complete for t in baselines)
    assert "speed-aware plan(s) (uniform latency / FP32 here: int8 " in summary.seeding
    # a seed equal to a uniform baseline's plan is not enqueued again (it would only be told the baseline's values)
    from pipeline.search.storage import T_DUPLICATE_OF

    assert not {t.user_attrs.get(T_DUPLICATE_OF) for t in seeded} & {t.number for t in baselines}
    assert re.search(r"seeds: \d+ solver plans, \d+ of them speed-aware \(uniform latency / FP32 here: .*\); \d+ "
                     r"enqueued, the rest equal to a uniform baseline's plan", out)

    # resumed for two more trials: the table comes from the cache, nothing is measured again
    again = run_search(cfg, SearchOptions(study="auto-seed", trials=12, parallel=2, progress="lines",
                                          tracking_uri=mlflow_uri))
    out = capsys.readouterr().out
    assert "sensitivity table from the cache (8 cells" in out and "measuring the sensitivity table" not in out
    assert "from the cache" in again.seeding
    # ... and the baselines' re-timing from the study: the speed ratios the seeds were solved with stand
    assert "timing the 4 uniform baselines again" not in out
    assert open_study(cfg, "auto-seed").user_attrs[A_BASELINE_RETIMING] == retimed


@pytest.mark.slow
def test_proposals_the_eval_screen_rules_out_end_pruned_and_baselines_are_never_screened(
        ray_local, mlflow_uri, make_config):
    from pipeline.search.storage import T_FAIL_REASON
    from tests.pipeline.sensitivity.conftest import FRAGILE_FACTORY

    # fp32 | int4 per layer on an MLP whose fc1 cannot take int4: about half the proposals are hopeless
    cfg = make_config("digits_mlp.yaml", **{"model.factory": FRAGILE_FACTORY, "search.formats": ["fp32", "int4"],
                                            "search.int4_block_sizes": [64], "search.trials": 10,
                                            "search.screen.min_rows": 100, "measure.eval_batch_size": 32})
    summary = run_search(cfg, SearchOptions(study="screen", parallel=2, progress="off", tracking_uri=mlflow_uri))
    study = open_study(cfg, "screen")
    pruned = [t for t in study.get_trials() if t.state is optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs[T_FAIL_REASON].startswith("pruned early: accuracy drop") for t in pruned)
    assert all(t.params["layer:fc1"] == "int4" for t in pruned)  # only what cannot be within the budget
    baselines = [t for t in study.get_trials() if t.user_attrs.get("baseline")]
    assert len(baselines) == 2 and all(t.state is optuna.trial.TrialState.COMPLETE for t in baselines)
    from pipeline.search.storage import study_counts

    counts = study_counts(study)  # a pruned proposal is not a measured trial (16 plans in all: it may stop early)
    assert (summary.trials_complete, summary.trials_failed) == (counts.complete, counts.failed)
    assert counts.complete + len(pruned) + counts.duplicates == len(study.get_trials())
    _, runs = _children(summary, "screen")
    reasons = [r.data.tags.get(S.TAG_FAIL_REASON, "") for r in runs if r.info.status == "FAILED"]
    assert sum(1 for x in reasons if x.startswith("pruned early")) == len(pruned)
