"""Objectives: the registry every part reads, the energy rules and their one label, the slots a study holds.

No mocks needed: objectives are read from real TrialResult/Measurement models, the review table and the
model card are rendered from an in-memory study record (the same classes the MLflow reader builds).
"""

from __future__ import annotations

import pytest

from pipeline.objectives import decide_energy_mode, energy_label, objective_infos, objective_values
from pipeline.results import EnergyReport, Measurement, TrialResult


def _result(energy_source: str | None, accuracy=0.95, latency=2.0, size=1000) -> TrialResult:
    energy = None if energy_source is None else EnergyReport(
        source=energy_source, meter=f"{energy_source} meter", joules_per_inference=0.5,
        joules_per_1k_inferences=500.0, average_power_w=10.0, gco2e_per_1m_inferences=1.0,
        grid_intensity_g_per_kwh=473.0)
    m = Measurement(backend="ort-cpu", device="cpu", metric="accuracy", accuracy=accuracy, reference_accuracy=0.97,
                    accuracy_drop=0.97 - accuracy, batch_size=8, latency_ms_p50=latency, latency_ms_p95=latency,
                    throughput_per_s=1.0, size_bytes=size, effective_bits_per_weight=8.0, energy=energy)
    return TrialResult(plan_yaml="", plan_summary="", method="ptq", layers=[], measurement=m, artifact_path="x.onnx")


def test_energy_slot_is_metered_energy_or_latency_and_says_which():
    names = ["accuracy", "energy", "size"]
    mode, note = decide_energy_mode(_result("rapl"), names)
    assert mode == "energy" and "rapl" in note
    mode, note = decide_energy_mode(_result("estimated"), names)
    assert mode == "latency" and "estimated" in note
    assert decide_energy_mode(_result(None), names)[0] == "latency"
    # latency already an objective: keep the estimate in the energy slot rather than duplicate latency
    assert decide_energy_mode(_result("estimated"), ["accuracy", "energy", "latency"])[0] == "energy"

    infos = objective_infos(names, "accuracy", True, "latency")
    assert [o.source for o in infos] == ["accuracy", "latency", "size"]
    assert [o.direction for o in infos] == ["maximize", "minimize", "minimize"]
    assert objective_values(_result("estimated"), infos) == [0.95, 2.0, 1000.0]
    infos = objective_infos(names, "accuracy", True, "energy")
    assert objective_values(_result("nvml"), infos) == [0.95, 0.5, 1000.0]
    with pytest.raises(ValueError, match="did not measure"):
        objective_values(_result(None), infos)
    # a lower-is-better metric (mse) is minimised
    assert objective_infos(["accuracy"], "mse", False, None)[0].direction == "minimize"


def test_a_trial_metered_by_another_source_is_refused_whatever_the_studys_source():
    from pipeline.objectives import energy_source_mismatch

    for study_source, trial_source in (("estimated", "rapl"), ("estimated", "nvml"), ("rapl", "estimated"),
                                       ("nvml", "rapl")):
        why = energy_source_mismatch(study_source, _result(trial_source))
        assert why and study_source in why and trial_source in why
    assert energy_source_mismatch("estimated", _result("estimated")) is None
    assert energy_source_mismatch(None, _result("rapl")) is None  # nothing pinned yet: this trial decides
    assert energy_source_mismatch("rapl", _result(None)) is None  # energy not measured this run



def test_the_accuracy_slot_is_shown_under_the_task_metrics_name():
    from pipeline.objectives import objective_infos

    custom = objective_infos(["accuracy", "size"], "mypkg.metrics:r2", True, None)
    assert [o.header for o in custom] == ["r2", "size bytes"]
    assert custom[0].column == "accuracy"  # machine-readable keys (CSV, MLflow) stay stable
    assert objective_infos(["accuracy"], "accuracy", True, None)[0].header == "accuracy"
    assert objective_infos(["accuracy"], "spearman", True, None)[0].header == "spearman"


def test_the_energy_label_has_one_wording():
    """Pinned: the review table and the model card used to label the same trial differently."""
    assert energy_label("estimated", 0.5) == "estimated"
    assert energy_label("rapl", 0.5) == "metered (rapl)"
    assert energy_label("nvml", 0.5) == "metered (nvml)"
    for source, joules in (("none", 0.5), (None, 0.5), ("", 0.5), ("rapl", None), ("estimated", None)):
        assert energy_label(source, joules) == "not measured"


def _study(fp32_source: str, trial_source: str):
    from pipeline.search.records import StudyRecord, TrialRecord

    def rec(n, baseline, source, joules, acc, size, lat):
        return TrialRecord(number=n, state="COMPLETE", baseline=baseline, on_front=True, run_id=f"run{n}",
                           energy_source=source, metrics={"accuracy": acc, "joules_per_inference": joules,
                                                          "size_bytes": size, "latency_ms_p50": lat,
                                                          "accuracy_drop": 0.97 - acc},
                           tags={"backend": "ort-cpu", "device": "cpu", "energy_source": source})
    return StudyRecord("1", "exp", "s", "parent", {}, [rec(0, "uniform-fp32", fp32_source, 0.002, 0.97, 4000, 1.0),
                                                       rec(1, None, trial_source, 0.001, 0.96, 1000, 0.5)])


@pytest.mark.parametrize("source", ["estimated", "rapl"])
def test_review_table_and_model_card_label_a_trial_alike(source):
    from pipeline.promotion.choose import Choice
    from pipeline.promotion.publish import model_card, savings_vs_fp32
    from pipeline.tracking.review import energy_table

    study = _study(source, source)
    rows, _ = energy_table(study, {})
    label = "estimated" if source == "estimated" else f"metered ({source})"
    assert [r.energy for r in rows] == [label, label]
    t = study.trial(1)
    card = model_card(study, Choice(t, "trial", "test"), registry_name="m", version="1", alias="champion",
                      plan_yaml="layers: {}", result=None, savings=savings_vs_fp32(study, t))
    assert f"Energy: {label}." in card and f"({label} energy)" in card
