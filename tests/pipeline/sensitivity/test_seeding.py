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
def seeded_config(fragile_config, fragile_search_table):  # the cache this config reads
    cfg = fragile_config.model_copy(deep=True)
    cfg.base_dir = fragile_config.base_dir
    cfg.search.sensitivity.seed = True
    cfg.search.sensitivity.eval_limit = EVAL_LIMIT
    cfg.search.sensitivity.bits_budgets = [6.0, 8.0]
    return cfg


def test_seeds_enqueue_and_rebuild_exactly(seeded_config, fragile_search_table):
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


def test_measured_speed_puts_the_fastest_feasible_plan_first_and_keeps_every_solver_plan(seeded_config):
    from pipeline.sensitivity.solver import predicted_latency
    from pipeline.sensitivity.speed import FormatSpeed

    seeding = seeding_for(seeded_config)
    static = list(seeding.plans)
    assert seeding.ordered_plans(None) == static and seeding.speed_seeds == 0  # no baselines timed: as before
    speed = FormatSpeed(ratios={Format.INT8: 0.4, Format.INT4: 1.2})  # INT8 fast, INT4 slower than FP32 here
    plans = seeding.ordered_plans(speed)
    assert seeding.speed_seeds >= 1 and len(plans) == len(static) + seeding.speed_seeds
    assert all(p in plans for p in static) and static[0] in plans[:2]  # the smallest feasible plan comes early
    names = seeding.table.layers
    keys = [tuple(p.resolve(names)[n].format for n in names) for p in plans]
    assert len(set(keys)) == len(keys)
    # the first seed is the fastest predicted plan within the budget among all of them
    feasible = [p for p in plans if seeding.table.predicted_drop(p) <= seeding.budget + 1e-12]
    first = predicted_latency(seeding.table, speed, plans[0])
    assert plans[0] in feasible and first == min(predicted_latency(seeding.table, speed, p) for p in feasible)
    assert "speed-aware plan(s) (uniform latency / FP32 here: int8 0.40x, int4 1.20x)" in seeding.summary()


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
    cfg = fragile_config.model_copy(deep=True)
    cfg.base_dir = fragile_config.base_dir
    cfg.search.sensitivity.seed = False
    seeding = seeding_for(cfg)
    assert seeding.table is None and seeding.plans == [] and seeding.allowed is None
    assert seeding.skip_reason(QuantPlan.uniform("int4")) is None
    assert {Format.BF16, Format.FP8} <= seeding.emulated["fc1"]
    assert sensitivity_seeds(cfg) == [] and seeding.summary() == ""


def test_seeds_respect_pins_excludes_and_a_format_list_without_fp32(seeded_config):
    cfg = seeded_config.model_copy(deep=True)
    cfg.base_dir = seeded_config.base_dir
    cfg.search.pin = {"fc4": Format.INT8}
    cfg.search.exclude = ["fc3"]
    cfg.search.formats = [Format.INT8, Format.INT4]
    seeding = seeding_for(cfg)
    assert seeding.plans and seeding.table.layers == ["fc1", "fc2"]  # the searched layers only
    names = ["fc1", "fc2", "fc3", "fc4"]
    space = SearchSpace.build(cfg.search, names, **space_inputs(cfg, None, seeding))
    for plan in seeding.plans:
        r = plan.resolve(names)
        assert r["fc4"].format is Format.INT8 and r["fc3"].format is Format.FP32
        assert r["fc1"].format is Format.INT8  # int4 pruned, fp32 not in search.formats
        space.params_for({n: c.format for n, c in r.items()})  # every seed is a point of the space


def test_the_table_covers_the_searched_layers_and_the_native_formats(fragile_config):
    from pipeline.sensitivity.seeding import reference_for, table_scope

    cfg = fragile_config.model_copy(deep=True)
    cfg.search.pin, cfg.search.exclude = {"fc4": Format.INT8}, ["fc3"]
    scope = table_scope(cfg, reference_for(fragile_config).layer_table)
    assert scope.layers == ["fc1", "fc2"]
    assert scope.formats == [Format.INT8, Format.INT4]  # bf16/fp8 only emulated on ORT CPU: no cells for them
    assert scope.left_out == [Format.BF16, Format.FP8] and scope.cells == 4
    cfg.search.include_emulated = True
    assert table_scope(cfg, reference_for(fragile_config).layer_table).formats == [
        Format.BF16, Format.FP8, Format.INT8, Format.INT4]


def test_seed_auto_weighs_the_tables_cost_against_the_search():
    from pipeline.sensitivity.seeding import TABLE_SHARE, seed_decision

    assert not seed_decision(False, 4, 30, None).measure
    d = seed_decision(True, 400, 30, None)
    assert d.measure and d.deadline_s is None
    d = seed_decision("auto", 8, 30, None)  # cheaper than the search's trials: measured in full
    assert d.measure and d.deadline_s is None and "no more than the 30 trials" in d.reason
    d = seed_decision("auto", 78, 30, None)  # MiniLM's 39 layers x {int8, int4} against 30 trials: not measured
    assert not d.measure and "78 single-layer candidates" in d.reason and "make sensitivity" in d.reason
    d = seed_decision("auto", 78, 30, 1800.0)  # a time budget: a third of it, charged to it
    assert d.measure and d.deadline_s == TABLE_SHARE * 1800.0


def test_seed_auto_uses_a_cached_table_whatever_its_cost(seeded_config, fragile_search_table):
    cfg = seeded_config.model_copy(deep=True)
    cfg.base_dir = seeded_config.base_dir
    cfg.search.sensitivity.seed = "auto"
    lines = []
    seeding = seeding_for(cfg, trials=1, say=lines.append)  # 8 cells > 1 trial, but cached: free
    assert seeding.table is not None and seeding.table.from_cache and seeding.plans
    assert lines and "from the cache" in lines[0]
    assert seeding.summary().startswith("seeded: ") and "from the cache" in seeding.summary()


def test_seed_auto_skips_an_uncached_table_that_costs_more_than_the_search(fragile_config, tmp_path):
    from pipeline.sensitivity.seeding import reference_for

    cfg = fragile_config.model_copy(deep=True, update={"workdir": str(tmp_path / "w")})
    cfg.base_dir = fragile_config.base_dir
    cfg.search.sensitivity.seed = "auto"
    reference_for(cfg)  # export first: the decision must not be what creates the folder below
    lines = []
    seeding = seeding_for(cfg, trials=3, say=lines.append)
    assert seeding.table is None and seeding.plans == [] and seeding.allowed is None
    assert seeding.note.startswith("not seeded: ") and lines == [seeding.note] and seeding.summary() == seeding.note
    assert not (cfg.work_path / "sensitivity").exists()  # nothing measured


def test_seed_auto_under_a_time_budget_stops_at_its_share_and_charges_it(fragile_config, tmp_path):
    cfg = fragile_config.model_copy(deep=True, update={"workdir": str(tmp_path / "w")})
    cfg.base_dir = fragile_config.base_dir
    cfg.search.sensitivity.seed = "auto"
    cfg.search.sensitivity.eval_limit = EVAL_LIMIT
    lines = []
    seeding = seeding_for(cfg, trials=1, time_budget_s=1e-6, say=lines.append)  # its share ends at once
    assert seeding.table is None and "did not fit its share of the time budget" in seeding.note
    assert "0 of 8 candidates measured" in seeding.note and seeding.charged_s > 0
    assert "at most" in lines[0] and lines[-1] == seeding.note
    # a budget it fits in: measured, seeded, and the time it took is charged to the search's budget
    seeding = seeding_for(cfg, trials=1, time_budget_s=3600, say=lines.append)
    assert seeding.table is not None and not seeding.table.from_cache and seeding.plans
    assert 0 < seeding.charged_s < 1200


def _seeded_encoder(encoder_config, tmp_path, formats, group_layers):
    """The tiny encoder, seeded (seed: true), in its own workdir, with these formats and this grouping."""
    cfg = encoder_config.model_copy(deep=True, update={"workdir": str(tmp_path / "w")})
    cfg.base_dir = encoder_config.base_dir
    cfg.search.formats, cfg.search.group_layers = formats, group_layers
    cfg.search.sensitivity.seed, cfg.search.sensitivity.eval_limit = True, 64
    return cfg


def test_a_grouped_search_measures_each_group_as_one_candidate(encoder_config, tmp_path):
    """search.group_layers: role -> one candidate per role group x format; member drops sum to the group's."""
    from pipeline.sensitivity.render import summary_lines, write_csv
    from pipeline.sensitivity.seeding import reference_for, table_scope

    cfg = _seeded_encoder(encoder_config, tmp_path, [Format.FP32, Format.INT8, Format.INT4], "role")
    scope = table_scope(cfg, reference_for(cfg).layer_table)
    assert scope.grouping == "role" and len(scope.layers) == 9 and scope.cells == 2 * len(scope.groups) < 18
    assert any(len(m) == 2 for m in scope.groups.values())  # the two blocks' copies of a role share a candidate
    seeding = seeding_for(cfg)
    t = seeding.table
    assert t.grouping == "role" and len(t.cells) == 2 * 9  # every layer has its cell, from its group's candidate
    for group, members in scope.groups.items():
        for f in (Format.INT8, Format.INT4):
            cells = [t.cell(m, f) for m in members]
            if len(members) == 1:  # a layer outside the repeated blocks (the embedding) is its own candidate
                assert cells[0].group is None and cells[0].decisive_drop == cells[0].drop
                continue
            assert all(c.group == group for c in cells) and len({c.group_drop for c in cells}) == 1
            assert sum(c.drop for c in cells) == pytest.approx(cells[0].group_drop, abs=1e-12)
            # the additive screen over a whole group gives back the measured group drop (negatives count 0)
            plan = QuantPlan(layers={**{m: f for m in members}, "*": "fp32"})
            assert t.predicted_drop(plan) == pytest.approx(max(cells[0].group_drop, 0.0), abs=1e-12)
    assert "one per role group" in summary_lines(t)[1]
    rows = write_csv(t, tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].endswith("group,group_drop") and len(rows) == 19
    again = seeding_for(cfg)  # cached under the grouping: read back, not measured again
    assert again.table.from_cache and again.table.grouping == "role"


def test_no_cell_is_measured_for_a_format_the_search_never_proposes_there(encoder_config, tmp_path):
    """fp8 runs natively on ORT CPU only as an embedding table: it stays in the table for the embedding and is
    not measured for the matmuls, where the backend only emulates it (and the search leaves it out)."""
    from pipeline.sensitivity.seeding import reference_for, table_scope

    cfg = _seeded_encoder(encoder_config, tmp_path, [Format.FP32, Format.FP8, Format.INT8], "layer")
    scope = table_scope(cfg, reference_for(cfg).layer_table)
    assert scope.formats == [Format.FP8, Format.INT8] and set(scope.skip) == set(scope.layers) - {"embed"}
    assert scope.cells == 2 + (len(scope.layers) - 1)  # embed: fp8 + int8; each matmul: int8 only
    seeding = seeding_for(cfg)
    t = seeding.table
    assert {(c.layer, c.format) for c in t.cells if c.format is Format.FP8} == {("embed", Format.FP8)}
    assert len(t.cells) == scope.cells
    space = SearchSpace.build(cfg.search, reference_for(cfg).layer_table.names, **space_inputs(cfg, None, seeding))
    for plan in seeding.plans:  # every seed is a point of the space (no emulated fp8 matmul)
        space.params_for({n: c.format for n, c in plan.resolve(reference_for(cfg).layer_table.names).items()})


def test_an_emulated_format_the_space_keeps_is_not_pruned_by_the_seeding(cnn_config, tmp_path):
    """int4 on a Conv is emulated on ORT CPU (stored int4, computed in fp32) but it is the only way to a smaller
    conv, so the space keeps it; the table has no cell for it, and the seeding must neither prune it ("pruned by
    sensitivity" with no measurement behind it) nor seed it (the solver needs a measured drop)."""
    from pipeline.sensitivity.render import rich_table
    from pipeline.sensitivity.seeding import backend_emulated, reference_for

    cfg = cnn_config.model_copy(deep=True, update={"workdir": str(tmp_path / "w")})
    cfg.base_dir = cnn_config.base_dir
    cfg.search.formats, cfg.search.int8_activations = [Format.FP32, Format.INT8, Format.INT4], ["static"]
    cfg.search.sensitivity.seed, cfg.search.sensitivity.eval_limit = True, 64
    names = reference_for(cfg).layer_table.names
    emulated = backend_emulated(cfg, reference_for(cfg).layer_table)
    convs = [n for n in names if Format.INT4 in emulated.get(n, set())]
    assert convs, "the digits CNN's convs run int4 emulated on ORT CPU"
    seeding = seeding_for(cfg)
    assert all(Format.INT4 in seeding.allowed[n] for n in convs)
    assert not any(seeding.table.cell(n, Format.INT4) for n in convs)
    space = SearchSpace.build(cfg.search, names, **space_inputs(cfg, None, seeding))
    assert space.choices.everywhere(Format.INT4)  # uniform INT4 stays a baseline of the seeded search
    assert not any("pruned" in note and "int4" in note for note in space.choices.notes), space.choices.notes
    for plan in seeding.plans:
        formats = {n: c.format for n, c in plan.resolve(names).items()}
        assert not any(formats[n] is Format.INT4 for n in convs)
    # a proposal with such a cell is judged on its measured cells (the unknown one adds nothing), never as "inf"
    plan = QuantPlan(layers={convs[0]: "int4"})
    assert seeding.skip_reason(plan) is None
    hopeless = QuantPlan(layers={**{n: "int4" for n in convs}, **{n: "int8" for n in names if n not in convs}})
    reason = seeding.skip_reason(hopeless)
    assert reason is None or ("inf" not in reason and f"{len(convs)} layer choice(s) not in the table" in reason)
    # the sensitivity table shows such a cell as not measured, not as a failed candidate
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(rich_table(seeding.table))
    assert "failed" not in console.export_text()
