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
