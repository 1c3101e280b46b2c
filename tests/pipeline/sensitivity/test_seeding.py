"""What the runner gets: seeds that enqueue into a real Optuna study, per-layer formats for the
space, and the skip screen reported to Optuna as a PRUNED trial with its reason."""

from __future__ import annotations

import optuna
import pytest

from pipeline.formats import Format
from pipeline.plan import QuantPlan
from pipeline.sensitivity import seeding_for, sensitivity_seeds, space_inputs
from search_spaces.space import SearchSpace
from tests.pipeline.sensitivity.conftest import EVAL_LIMIT

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def seeded_config(fragile_config, fragile_table):  # fragile_table: the cache this config reads
    cfg = fragile_config.model_copy(deep=True)
    cfg.base_dir = fragile_config.base_dir
    cfg.search.sensitivity.seed = True
    cfg.search.sensitivity.eval_limit = EVAL_LIMIT
    cfg.search.sensitivity.bits_budgets = [6.0, 8.0]
    return cfg


def test_seeds_enqueue_and_rebuild_exactly(seeded_config, fragile_table):
    seeding = seeding_for(seeded_config)
    assert seeding.table is not None and seeding.table.from_cache
    names = seeding.table.layers
    assert Format.INT4 not in seeding.allowed["fc1"]
    assert Format.BF16 not in seeding.allowed["fc2"]  # emulated on ORT CPU: left out by default
    assert seeding.plans and all(p.resolve(names)["fc1"].format is not Format.INT4 for p in seeding.plans)
    space = SearchSpace.build(seeded_config.search, names, **space_inputs(seeded_config, None, seeding))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for plan in seeding.plans:
        params = space.params_for({n: c.format for n, c in plan.resolve(names).items()})
        study.enqueue_trial(params, user_attrs={"seed": "sensitivity"})
    for plan in seeding.plans:
        trial = study.ask()
        got = space.suggest(trial)
        assert {n: c.format for n, c in got.resolve(names).items()} == \
               {n: c.format for n, c in plan.resolve(names).items()}
        assert seeding.skip_reason(got) is None
        study.tell(trial, [0.9, 1.0])


def test_seeds_with_the_runners_evaluator_read_the_same_cache(seeded_config):
    from pipeline.sensitivity.measure import evaluator_class

    plans = sensitivity_seeds(seeded_config, evaluator_class()(seeded_config))
    assert [p.to_yaml() for p in plans] == [p.to_yaml() for p in seeding_for(seeded_config).plans]


def test_hopeless_proposals_are_pruned_with_the_reason(seeded_config):
    seeding = seeding_for(seeded_config)
    reason = seeding.skip_reason(QuantPlan.uniform("int4"))
    assert reason and "predicted accuracy drop" in reason and "max_accuracy_drop" in reason
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    trial.set_user_attr("skipped", reason)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    (t,) = study.get_trials()
    assert t.state is optuna.trial.TrialState.PRUNED and t.user_attrs["skipped"] == reason


def test_without_the_seed_switch_nothing_is_measured(fragile_config):
    assert not fragile_config.search.sensitivity.seed
    seeding = seeding_for(fragile_config)
    assert seeding.table is None and seeding.plans == [] and seeding.allowed is None
    assert seeding.skip_reason(QuantPlan.uniform("int4")) is None
    assert {Format.BF16, Format.FP8} <= seeding.emulated["fc1"]
    assert sensitivity_seeds(fragile_config) == []


def test_seeds_respect_pins_excludes_and_a_format_list_without_fp32(seeded_config):
    cfg = seeded_config.model_copy(deep=True)
    cfg.base_dir = seeded_config.base_dir
    cfg.search.pin = {"fc4": Format.INT8}
    cfg.search.exclude = ["fc3"]
    cfg.search.formats = [Format.INT8, Format.INT4]
    seeding = seeding_for(cfg)
    assert seeding.plans
    space = SearchSpace.build(cfg.search, seeding.table.layers, **space_inputs(cfg, None, seeding))
    for plan in seeding.plans:
        r = plan.resolve(seeding.table.layers)
        assert r["fc4"].format is Format.INT8 and r["fc3"].format is Format.FP32
        assert r["fc1"].format is Format.INT8  # int4 pruned, fp32 not in search.formats
        space.params_for({n: c.format for n, c in r.items()})  # every seed is a point of the space
