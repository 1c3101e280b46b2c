"""Names shared by everything that writes or reads the MLflow record of a study.

The search writes runs with these tags; ``promote``, ``front`` and the review
report find them by the same tags. Keeping the names in one module is what lets
those pieces evolve separately.

Layout: one MLflow experiment per config (``tracking.experiment``, default the
config's ``name``); one parent run per study; one child run per trial
(``mlflow.parentRunId`` set) whose metric names are ``TrialResult.flat_metrics()``.
"""

TAG_STUDY = "precision_search.study"  # study name, on parent and children
TAG_ROLE = "precision_search.role"  # "study" (parent) | "trial" (child)
TAG_TRIAL_NUMBER = "precision_search.trial_number"  # Optuna trial number (children)
TAG_STATE = "precision_search.state"  # COMPLETE | FAIL | PRUNED (children)
TAG_FAIL_REASON = "precision_search.fail_reason"
TAG_PARETO = "pareto"  # "true" | "false" on children; refreshed as trials finish
TAG_BASELINE = "precision_search.baseline"  # e.g. "uniform-int8" for the uniform baselines
TAG_METHOD = "precision_search.method"  # ptq | qat
TAG_BACKEND = "backend"
TAG_DEVICE = "device"
TAG_ENERGY_SOURCE = "energy_source"  # nvml | rapl | estimated
TAG_EXECUTION = "execution"  # "native" if every quantized layer ran natively, else "emulated" / "mixed"
TAG_CONFIG_HASH = "precision_search.config_hash"

ROLE_STUDY = "study"
ROLE_TRIAL = "trial"

ARTIFACT_MODEL = "candidate"  # mlflow.onnx.log_model(name=ARTIFACT_MODEL) on each trial run
ARTIFACT_PLAN = "plan.yaml"
ARTIFACT_RESULT = "result.json"  # TrialResult.model_dump_json()
ARTIFACT_ENGINE = "engine"  # TensorRT engine folder, where built
ARTIFACT_FRONT_TABLE = "pareto/front.csv"
ARTIFACT_FRONT_PLOT_PNG = "pareto/front.png"
ARTIFACT_FRONT_PLOT_HTML = "pareto/front.html"
