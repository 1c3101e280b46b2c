"""Plans as the search sees them: their identity (:func:`plan_key`), their MLflow tags, and duplicates.

Duplicate proposals: a sampled plan equal to a COMPLETE trial's plan is not
measured again; Optuna is told the original's values (see
:meth:`Duplicates._tell_duplicate` for how it is recorded), it does not count
toward ``--trials``, and after ``max_consecutive_duplicates`` such proposals in a
row the search stops asking and says why.
"""

from __future__ import annotations

from typing import Any

from pipeline.search.storage import T_DUPLICATE_OF, T_PLAN_KEY, T_PLAN_SUMMARY, T_RUN_ID, study_counts


def plan_key(plan, layer_names: list[str]) -> str:
    """Identity of what a plan measures (:meth:`pipeline.plan.ResolvedPlan.key`)."""
    return plan.resolve(layer_names).key()


def layer_tags(plan, layer_names: list[str]) -> dict[str, str]:
    """layer -> "int8(dyn)", "int4(b32)", ... (:meth:`pipeline.plan.ResolvedPlan.tags`)."""
    return plan.resolve(layer_names).tags()


def knobs(plan, params: dict) -> dict[str, Any]:
    from search_spaces.space import LAYER_PREFIX

    out: dict[str, Any] = {"method": plan.method}
    out.update({k: v for k, v in params.items() if not k.startswith(LAYER_PREFIX)})
    return out


class Duplicates:
    """Mixed into :class:`pipeline.search.runner.StudyRunner`: finding and recording re-proposed plans."""

    def _measured_plans(self) -> dict[str, Any]:
        """plan key -> the first COMPLETE, measured trial with that plan (cached by trial number)."""
        from optuna.trial import TrialState

        cache = self._plan_key_cache
        out: dict[str, Any] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get(T_DUPLICATE_OF) is not None:
                continue
            key = cache.get(t.number)
            if key is None:
                key = t.user_attrs.get(T_PLAN_KEY)
                if key is None:  # a trial from before plan keys were stored
                    try:
                        key = plan_key(self.space.plan_from_params(t.params), self.layer_names)
                    except (KeyError, ValueError):
                        key = ""
                cache[t.number] = key
            if key and key not in out:
                out[key] = t
        return out

    def _tell_duplicate(self, trial, original, summary: str) -> None:
        """Record a proposal of an already measured plan without measuring it again.

        Optuna is told the original's objective values and constraint, so the
        sampler learns that this region is known (and, under a fixed seed, moves
        on) and the trial's ``duplicate_of`` attribute says where the numbers come
        from. No MLflow child run is created: a run without a model would sit on
        the front next to its original with identical metrics (a second point that
        cannot be promoted), and a run pointing at the original's model would make
        one artifact look like two candidates. Instead the original's run gets a
        ``precision_search.duplicates`` tag listing the trials that re-proposed it,
        the parent run counts them (``trials_duplicate``), and the progress log
        prints one line per duplicate. Duplicates do not count toward ``--trials``
        (which counts measured trials) and never join the front themselves.
        """
        for name, value in (original.constraints or {}).items():
            trial.set_constraint(name, value)
        trial.set_user_attr(T_DUPLICATE_OF, original.number)
        trial.set_user_attr(T_PLAN_SUMMARY, summary)
        self.study.tell(trial, list(original.values))
        self.duplicates.setdefault(original.number, []).append(trial.number)
        run_id = self.run_ids.get(original.number) or original.user_attrs.get(T_RUN_ID)
        if run_id:
            self._track(self.tracker.mark_duplicates, run_id, self.duplicates[original.number])
        self.progress.trial_finished(trial.number, "COMPLETE",
                                     f"duplicate of trial {original.number} (plan already measured; "
                                     f"its values reused, not measured again)", counts=study_counts(self.study))

    def _start_run(self, number: int, params: dict, label: str | None, retry_of: int | None) -> str | None:
        try:
            plan = self.space.plan_from_params(params)
        except (KeyError, ValueError):
            from search_spaces.space import LAYER_PREFIX

            return self._track(self.tracker.start_trial, number, label, "", "(incomplete parameters)",
                               {k[len(LAYER_PREFIX):]: v for k, v in params.items() if k.startswith(LAYER_PREFIX)},
                               {k: v for k, v in params.items() if not k.startswith(LAYER_PREFIX)}, retry_of)
        return self._track(self.tracker.start_trial, number, label, plan.to_yaml(), plan.summary(self.layer_names),
                           layer_tags(plan, self.layer_names), knobs(plan, params), retry_of)
