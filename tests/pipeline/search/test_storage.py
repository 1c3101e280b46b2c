"""Counts come from the Optuna storage; durations for --time-budget are parsed as people write them."""

from __future__ import annotations

import optuna
import pytest

from pipeline.search.budget import format_duration, parse_duration
from pipeline.search.storage import study_counts


def test_counts_come_from_the_storage():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(directions=["maximize", "minimize"])
    d = {"x": CategoricalDistribution(["a", "b"])}

    def add(state, **attrs):
        values = [0.9, 1.0] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, params={"x": "a"}, distributions=d,
                                     user_attrs=attrs))

    add(TrialState.COMPLETE)
    add(TrialState.COMPLETE)
    add(TrialState.COMPLETE, duplicate_of=0)
    add(TrialState.FAIL, fail_reason="boom")
    add(TrialState.FAIL, orphaned=True, fail_reason="orphaned")
    add(TrialState.WAITING)
    c = study_counts(study)
    assert (c.complete, c.failed, c.orphaned, c.duplicates, c.running, c.waiting) == (2, 1, 1, 1, 0, 1)
    assert c.measured == 3  # what --trials counts: not the orphan, not the duplicate


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("90s", 90), ("1h", 3600), ("1h30m", 5400),
                                           ("1.5h", 5400), ("600", 600), (" 2M ", 120)])
def test_durations_are_parsed_as_written(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "20x", "5m foo", "0s", "-5m"])
def test_bad_durations_say_what_is_expected(text):
    with pytest.raises(ValueError, match="duration|more than zero"):
        parse_duration(text)


def test_durations_are_printed_back_the_same_way():
    assert [format_duration(s) for s in (1.0, 90, 1200, 3600, 5400)] == ["1s", "90s", "20m", "1h", "1h30m"]


def test_the_cli_refuses_a_bad_time_budget_naming_the_option(capsys):
    from pipeline.cli import main

    assert main(["search", "--config", "search_spaces/digits_mlp.yaml", "--time-budget", "soon"]) != 0
    captured = capsys.readouterr()
    assert "--time-budget" in captured.out + captured.err and "20m" in captured.out + captured.err
