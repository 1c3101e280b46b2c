"""benchmarks/search_quality.py: the checkpoint arithmetic, and a small real run that prints every table."""

from __future__ import annotations

import importlib


def _module():
    return importlib.import_module("benchmarks.search_quality")


def test_prefix_after_trials_counts_pruned_and_failed_trials_as_spent():
    trace = [(0, "a"), (1, None), (2, "b"), (3, "c")]
    assert _module().prefix_after_trials(trace, 3) == ["a", "b"]
    assert _module().prefix_after_trials(trace, 0) == []


def test_prefix_after_seconds_charges_the_upfront_cost_and_each_new_plan_once():
    trace = [(0, "a"), (1, "a"), (2, None), (3, "b"), (4, "c")]
    cost = {"a": 10.0, "b": 5.0, "c": 20.0}
    m = _module()
    assert m.prefix_after_seconds(trace, cost, 15.0) == ["a", "a", "b"]  # the repeat of a is free
    assert m.prefix_after_seconds(trace, cost, 15.0, upfront=4.0) == ["a", "a"]
    assert m.prefix_after_seconds(trace, cost, 5.0, upfront=6.0) == []


def test_small_run_prints_final_and_checkpoint_tables(tmp_path, capsys):
    rc = _module().main(["--trials", "3", "--seeds", "0", "--strategies", "tpe", "random", "uniform",
                         "--after-trials", "2", "--after-minutes", "10", "--rounds", "1", "--runs", "2",
                         "--eval-rows", "200", "--workdir", str(tmp_path / "w")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "hypervolume after 3 trials" in out
    assert "2 trials" in out and "10 min" in out
    assert "load average" in out
