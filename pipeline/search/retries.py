"""Trials whose worker died: retried as new trials, a bounded number of times.

Ray retries a task whose worker process died (``max_retries`` in
:mod:`pipeline.search.ray_exec`); when the task still fails with a system error
(worker killed by the OOM killer, node lost), the trial is FAILED with Ray's
reason and its parameters are enqueued again (``retry_of``), so a plan is not
lost to a machine fault and the uniform baselines, which fix the hypervolume box
and the review, are always completed. A dead trial is marked ``system_retried``
and does not count toward ``--trials``.
"""

from __future__ import annotations

from pipeline.search.storage import T_BASELINE, T_RETRIES, T_RETRY_OF, T_SYSTEM_RETRIED

# A trial whose worker died (killed, OOM, node lost) after Ray's own task retries is enqueued again this
# many times (a uniform baseline more: the hypervolume box and the review need every baseline).
SYSTEM_RETRIES = 1
BASELINE_SYSTEM_RETRIES = 3
_SYSTEM_FAILURES = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "LocalRayletDiedError",
                    "RaySystemError", "ActorDiedError", "ObjectLostError", "OwnerDiedError")


def is_system_failure(reason: str) -> bool:
    """A trial that failed because its worker or node went away, not because of its plan."""
    return reason.startswith("the Ray task failed") and any(k in reason for k in _SYSTEM_FAILURES)


class Retries:
    """Mixed into :class:`pipeline.search.runner.StudyRunner` (uses its study)."""

    def _retry_system_failure(self, fl, reason: str) -> str:
        """A worker that died (after Ray's own task retries) fails its trial, not its plan: enqueue the
        plan again, a bounded number of times (more for a uniform baseline, which the study needs)."""
        if not is_system_failure(reason):
            return ""
        ua = fl.trial.user_attrs
        done = int(ua.get(T_RETRIES, 0))
        label = ua.get(T_BASELINE)
        limit = BASELINE_SYSTEM_RETRIES if label else SYSTEM_RETRIES
        if done >= limit or not fl.trial.params:
            return f"its worker died {done + 1} time(s); not retried again"
        attrs = {T_RETRY_OF: fl.trial.number, T_RETRIES: done + 1}
        if label:
            attrs[T_BASELINE] = label
        fl.trial.set_user_attr(T_SYSTEM_RETRIED, True)
        self.study.enqueue_trial(dict(fl.trial.params), user_attrs=attrs)
        return f"its worker died; the plan is retried as a new trial ({done + 1} of {limit})"
