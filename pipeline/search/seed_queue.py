"""The search's first trials: the uniform baselines, then the sensitivity solver's seeds once the baselines
say how fast each format runs here (mixed into :class:`pipeline.search.runner.StudyRunner`, which holds the
study, space, seeding and config). Apart from :mod:`pipeline.search.storage` (the study's record) because it
re-times the baselines through :mod:`pipeline.search.remeasure`, which itself reads that record."""

from __future__ import annotations

from pipeline.search.storage import (
    A_BASELINE_RETIMING,
    T_BASELINE,
    T_RESULT,
    T_SEED,
)


class SeedQueue:
    """Baselines first, then the seeds (speed-aware first), each enqueued once per study."""

    def _enqueue_baselines(self) -> None:
        if self.config.search.baselines:
            have = {t.user_attrs.get(T_BASELINE) for t in self.study.get_trials(deepcopy=False)}
            for label, params in self.space.uniform_baselines().items():
                if label not in have:
                    self.study.enqueue_trial(params, user_attrs={T_BASELINE: label})
        self._seeds_pending = bool(getattr(self, "seeding", None) and self.seeding.plans)
        self._maybe_enqueue_seeds()

    def _maybe_enqueue_seeds(self) -> None:
        """Enqueue the sensitivity solver's plans once the uniform baselines say how fast each format runs here.

        The solver's plans (least predicted drop per bits budget, greedy least-sensitive-first) and the
        speed-aware ones (fastest predicted within the accuracy budget, smallest and least-drop at a few
        latency budgets: :meth:`pipeline.sensitivity.seeding.Seeding.ordered_plans`) are measured early, so
        the search starts near the front instead of at random. The speed-aware solves weigh formats by the
        uniform baselines' measured latency, and INT8 layers take the activation mode (static / dynamic) of
        the faster uniform INT8 baseline (on ORT CPU dynamic wins for encoders and static for CNNs: guessing
        either way seeds slow plans), so the seeds wait for the baselines; called after every finished trial
        until done (at once on a resumed study).
        """
        if not getattr(self, "_seeds_pending", False):
            return
        timings = self._baseline_timings()
        if timings is None:
            return  # a uniform baseline is still to be measured
        from pipeline.sensitivity.speed import fastest_int8_mode, format_speed

        self._seeds_pending = False
        timings, source = self._retimed(timings)
        mode = fastest_int8_mode(timings) if len(self.config.search.int8_activations) > 1 else None
        plans = self.seeding.ordered_plans(format_speed(timings, source))
        seeded = {t.user_attrs.get(T_SEED) for t in self.study.get_trials(deepcopy=False)}
        baselines = list(self.space.uniform_baselines().values()) if self.config.search.baselines else []
        enqueued = 0
        for i, plan in enumerate(plans):
            label = f"sensitivity-{i}"
            if label not in seeded:
                formats = {n: c.format for n, c in plan.resolve(self.layer_names).items()}
                params = self.space.params_for(formats, method=plan.method, int8_activations=mode or plan.int8_activations,
                                               calibration=plan.calibration, int4_block_size=plan.int4_block_size)
                if params not in baselines:  # a uniform plan the baselines measured already
                    self.study.enqueue_trial(params, user_attrs={T_SEED: label})
                    enqueued += 1
        if self.seeding.speed is not None:  # the summary changed: say it, and keep the study run's tag current
            self._say(f"seeds: {len(plans)} solver plans, {self.seeding.speed_seeds} of them speed-aware "
                      f"({self.seeding.speed.describe()}); {enqueued} enqueued, the rest equal to a uniform "
                      "baseline's plan (measured already)")
            self._track(self.tracker.log_seeding, self.seeding.summary())

    def _retimed(self, timings):
        """The baselines' latencies from one interleaved re-timing (:func:`pipeline.search.remeasure.retime_baselines`)
        where it can run, else their in-search p50s; and a note saying which."""
        from dataclasses import replace

        from pipeline.search.remeasure import BaselineRetiming, retime_baselines

        if len(timings) < 2:
            return timings, "the baselines' in-search p50s"
        stored = self.study.user_attrs.get(A_BASELINE_RETIMING) or {}
        if stored.get("latency_ms") and set(stored["latency_ms"]) >= {t.label for t in timings}:
            got = BaselineRetiming(stored["latency_ms"], stored.get("method", ""))  # a resumed study: as it was
        else:
            self._say(f"timing the {len(timings)} uniform baselines again, interleaved, to order the formats by speed")
            got = retime_baselines(self.config, self.study)
            self.study.set_user_attr(A_BASELINE_RETIMING, {"latency_ms": got.latency_ms, "method": got.method,
                                                           "error": got.error})
        if not got.latency_ms:
            return timings, f"the baselines' in-search p50s (not re-timed: {got.error})"
        return ([replace(t, latency_ms=got.latency_ms.get(t.label, t.latency_ms)) for t in timings],
                f"baselines {got.method}")

    def _baseline_timings(self):
        """The finished uniform baselines' latencies (:class:`pipeline.sensitivity.speed.BaselineTiming`,
        complete ones only); None while one of them is still to be measured."""
        from pipeline.results import TrialResult
        from pipeline.sensitivity.speed import BaselineTiming

        modes = self.config.search.int8_activations
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get(T_BASELINE)]
        if any(not t.state.is_finished() for t in trials):
            return None
        out = []
        for t in trials:
            if t.state.name != "COMPLETE" or not t.user_attrs.get(T_RESULT):
                continue
            m = TrialResult.model_validate(t.user_attrs[T_RESULT]).measurement
            over = self.max_drop is not None and m.accuracy_drop is not None and m.accuracy_drop > self.max_drop
            timing = BaselineTiming.from_label(t.user_attrs[T_BASELINE], m.latency_ms_p50, over, modes)
            if timing is not None:
                out.append(timing)
        return out
