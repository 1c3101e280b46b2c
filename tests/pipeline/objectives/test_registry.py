"""The objective registry is the one place config, Optuna, MLflow, promotion and the front table read."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import objectives as O
from pipeline.results import EnergyReport, Measurement, TrialResult


def _result(probes: dict | None = None) -> TrialResult:
    energy = EnergyReport(source="rapl", meter="RAPL package-0", joules_per_inference=0.25,
                          joules_per_1k_inferences=250.0, average_power_w=10.0, gco2e_per_1m_inferences=3.0,
                          grid_intensity_g_per_kwh=473.0)
    m = Measurement(backend="ort-cpu", device="cpu", metric="accuracy", accuracy=0.9, batch_size=8,
                    latency_ms_p50=2.0, latency_ms_p95=3.0, throughput_per_s=4000.0, size_bytes=1234,
                    effective_bits_per_weight=8.0, energy=energy, probes=probes or {})
    return TrialResult(plan_yaml="", plan_summary="", method="ptq", layers=[], measurement=m, artifact_path="x.onnx")


def test_each_objective_is_declared_once_and_reads_its_logged_metric():
    assert O.names() == ["accuracy", "latency", "size", "energy", "carbon", "peak_memory"]
    result = _result({"peak_rss_delta_bytes": 4096.0})
    flat = result.flat_metrics()
    for o in O.all_objectives():
        # what Optuna is told (value) is what MLflow logs under the objective's metric, which promote reads back
        assert o.metric in flat, o.name
        assert o.value(result) == pytest.approx(flat[o.metric]), o.name
    assert O.measured(result) == {"accuracy": 0.9, "latency": 2.0, "size": 1234.0, "energy": 0.25, "carbon": 3.0,
                                  "peak_memory": 4096.0}
    with pytest.raises(ValueError, match="registered twice"):
        O.register(O.Objective(name="size", direction="maximize", unit="", label="", metric="x", read=lambda r: 0))


def test_a_trial_without_the_probe_did_not_measure_peak_memory():
    infos = O.objective_infos(["accuracy", "peak_memory"], "accuracy", True, None)
    assert [(o.source, o.direction) for o in infos] == [("accuracy", "maximize"), ("peak_memory", "minimize")]
    with pytest.raises(ValueError, match="'peak_memory' needs 'peak_memory', which this trial did not measure"):
        O.objective_values(_result(), infos)
    assert O.objective_values(_result({"peak_rss_delta_bytes": 10.0}), infos) == [0.9, 10.0]


def test_config_accepts_registered_objectives_and_names_the_rest(make_config):
    from pipeline.config import ConfigError

    cfg = make_config("digits_mlp.yaml", **{"search.objectives": ["accuracy", "peak_memory", "carbon"]})
    assert cfg.search.objectives == ["accuracy", "peak_memory", "carbon"]
    with pytest.raises(ConfigError, match=r"search\.objectives.*unknown objective.*'watts'.*peak_memory"):
        make_config("digits_mlp.yaml", **{"search.objectives": ["accuracy", "watts"]})


def test_front_columns_format_and_head_from_the_registry():
    infos = O.objective_infos(["accuracy", "size", "energy", "peak_memory"], "accuracy", True, "energy", "rapl")
    assert [o.header for o in infos] == ["accuracy", "size bytes", "energy J/inf", "peak_memory bytes"]
    assert [o.format(v) for o, v in zip(infos, [0.91234, 123456.0, 0.00012, 2048.0])] == \
        ["0.9123", "123,456", "1.200e-04", "2,048"]
    assert infos[2].label == "energy (J/inference, rapl)"


def test_min_objective_policies_come_from_the_registry():
    from pipeline.promotion.choose import Budget, PromotionError, choose, policies
    from pipeline.search.records import StudyRecord, TrialRecord

    assert policies() == ("max-accuracy", "min-latency", "min-size", "min-energy", "min-carbon", "min-peak_memory",
                          "knee")

    def rec(n, acc, size, lat):
        return TrialRecord(number=n, state="COMPLETE", on_front=True, energy_source="rapl",
                           metrics={"accuracy": acc, "accuracy_drop": 0.97 - acc, "size_bytes": size,
                                    "latency_ms_p50": lat})
    study = StudyRecord("1", "exp", "s", "parent", {}, [rec(0, 0.97, 4000, 1.0), rec(1, 0.96, 1000, 2.0),
                                                         rec(2, 0.80, 500, 0.1)])
    pick = choose(study, "min-size", Budget(max_accuracy_drop=0.02))
    assert pick.trial.number == 1 and pick.reason.startswith("lowest size (1000 bytes) of 2 front trial(s)")
    assert choose(study, "min-latency", Budget(max_accuracy_drop=0.02)).trial.number == 0
    assert choose(study, "min-latency", Budget(max_accuracy_drop=0.5)).trial.number == 2
    with pytest.raises(PromotionError, match="min-peak_memory: no trial on the front has a peak_memory measurement"):
        choose(study, "min-peak_memory", Budget(max_accuracy_drop=0.02))
    with pytest.raises(PromotionError, match="min-size needs an accuracy limit"):
        choose(study, "min-size", Budget())


def test_peak_rss_probe_sees_memory_touched_inside_the_window_only():
    from pipeline.objectives.peak_memory import PROBE_KEY, peak_rss_probe

    before = np.ones(64 * 2**20 // 8)  # 64 MiB resident before the window: not the window's
    with peak_rss_probe() as small:
        x = np.ones(1024)
    with peak_rss_probe() as big:
        y = np.ones(96 * 2**20 // 8)  # 96 MiB touched inside the window
        del y
    del before, x
    assert PROBE_KEY in small and PROBE_KEY in big  # Linux: /proc/self/clear_refs and VmHWM are readable
    assert big[PROBE_KEY] >= 80 * 2**20
    assert small[PROBE_KEY] < 16 * 2**20
