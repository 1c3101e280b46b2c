"""The `front` table names the energy source in the energy column and warns when sources differ."""

from __future__ import annotations

from pipeline.cli.front import energy_sources, print_front
from pipeline.objectives import objective_infos
from pipeline.search.records import TrialRecord

INFOS = objective_infos(["accuracy", "energy", "size"], "accuracy", True, "energy")


def _rec(n, source, acc=0.9, joules=0.01, size=1000.0, duplicate_of=None):
    return TrialRecord(number=n, state="COMPLETE", values={"accuracy": acc, "energy": joules, "size": size},
                       on_front=duplicate_of is None, energy_source=source, duplicate_of=duplicate_of)


def test_energy_column_names_its_source(capsys):
    print_front([_rec(0, "rapl"), _rec(1, "rapl", acc=0.8, joules=0.005)], INFOS, title="t", energy_source="rapl")
    out = capsys.readouterr().out
    assert "J/inf (rapl)" in out
    assert "not comparable" not in out


def test_mixed_sources_are_called_out_by_trial(capsys):
    records = [_rec(0, "estimated"), _rec(1, "rapl", acc=0.8, joules=0.005), _rec(2, "rapl", acc=0.7, joules=0.001)]
    assert energy_sources(records) == {"estimated": [0], "rapl": [1, 2]}
    print_front(records, INFOS, title="t")
    out = " ".join(capsys.readouterr().out.split())
    assert "J/inf (mixed)" in out
    assert "energy sources differ across these trials (estimated: trial(s) 0; rapl: trial(s) 1, 2)" in out
    assert "not comparable" in out


def test_duplicates_are_listed_as_such_and_not_counted_as_a_source(capsys):
    records = [_rec(0, "rapl"), _rec(3, "estimated", duplicate_of=0)]
    assert energy_sources(records) == {"rapl": [0]}
    print_front(records, INFOS, title="t")
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate of trial 0" in out and "not comparable" not in out


def test_front_and_promote_follow_the_studys_metric_direction_not_the_configs(tmp_path, capsys, monkeypatch):
    """A study scored with a lower-is-better metric, read through a config that names another (as a study made
    by the Python API is): `front` labels and judges by the study's metric, and max-accuracy picks the lowest."""
    from mlflow import MlflowClient

    from pipeline.cli import main
    from tests.conftest import ROOT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRECISION_SEARCH_STORAGE", raising=False)
    common = ["--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--set", f"workdir={tmp_path / 'w'}"]
    tiny = ["--set", "measure.runs=5", "--set", "measure.warmup=1", "--set", "measure.energy.min_seconds=0.05",
            "--set", "measure.energy.repeats=1", "--set", "measure.remeasure_rounds=0", "--set",
            "search.sensitivity.seed=false", "--set", "search.formats=[fp32,int8,int4]",
            # fc1 of this MLP cannot take int4: the front's error rates differ
            "--set", "model.factory=tests.pipeline.sensitivity.fragile:fragile_mlp", "--set", "name=digits-mlp",
            "--set", "search.int8_activations=[dynamic]", "--set", "search.calibrations=[minmax]",
            "--set", "search.max_accuracy_drop=0.5"]
    lower = ["--set", "metric.name=tests.pipeline.flaky_metric:error_rate", "--set", "metric.higher_is_better=false"]
    assert main(["search", *common, *tiny, *lower, "--trials", "6", "--parallel", "1", "--study", "err",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["front", *common, "--study", "err"]) == 0  # the config's metric: accuracy (higher is better)
    out = " ".join(capsys.readouterr().out.split())
    assert "was scored with metric 'tests.pipeline.flaky_metric:error_rate' (lower is better)" in out
    assert main(["promote", *common, "--study", "err", "--policy", "max-accuracy", "--max-latency-ms", "1e9"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{(tmp_path / 'w' / 'mlflow.db').resolve()}")
    front = [r for r in client.search_runs([client.get_experiment_by_name("digits-mlp").experiment_id])
             if r.data.tags.get("pareto") == "true"]
    import re

    chosen = re.search(r"trial (\d+) \(max-accuracy", out).group(1)
    by_number = {r.data.tags["precision_search.trial_number"]: r.data.metrics["accuracy"] for r in front}
    assert len(set(by_number.values())) > 1  # a real choice: the front's error rates differ
    assert by_number[chosen] == min(by_number.values())  # the lowest error rate, not the highest
