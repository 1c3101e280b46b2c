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
TAG_KNEE = "precision_search.knee"  # "true" on the front's knee as the search decided it (re-measured numbers)
TAG_BASELINE = "precision_search.baseline"  # e.g. "uniform-int8" for the uniform baselines
TAG_METHOD = "precision_search.method"  # ptq | qat
TAG_BACKEND = "backend"
TAG_DEVICE = "device"
TAG_ENERGY_SOURCE = "energy_source"  # nvml | rapl | estimated
TAG_EXECUTION = "execution"  # "native" if every quantized layer ran natively, else "emulated" / "mixed"
TAG_CONFIG_HASH = "precision_search.config_hash"

TAG_RETRY_OF = "precision_search.retry_of"  # child: the orphaned trial this one re-runs
TAG_FEASIBLE = "precision_search.feasible"  # child: "true" if the accuracy-drop constraint holds, else "false"
TAG_MODEL_URI = "precision_search.model_uri"  # child: models:/<id> of the candidate's ONNX logged model
TAG_MODEL_MISSING = "precision_search.model_missing"  # child: why the model was not logged (file gone on resume)
TAG_DUPLICATES = "precision_search.duplicates"  # child: later trials that proposed this same plan ("12,15")
TAG_NODE_ID = "precision_search.node_id"  # child: the Ray node that ran the trial (from inside its task)
TAG_HOSTNAME = "precision_search.hostname"  # child: that node's hostname
TAG_RAY_ATTEMPT = "precision_search.ray_attempt"  # child: Ray's attempt (> 0: re-run after a worker/node died)
TAG_REGISTERED = "precision_search.registered"  # child: "<registered model>/<version>" once promoted

# Parent (study) run tags.
TAG_ENERGY_OBJECTIVE = "precision_search.energy_objective"  # "energy" | "latency" (what the energy slot holds)
TAG_ENERGY_NOTE = "precision_search.energy_note"  # why, in words
TAG_ENERGY_METER = "precision_search.energy_meter"  # the first trial's meter description
TAG_ENERGY_METER_PINNED = "precision_search.energy_meter_pinned"  # nvml | rapl | estimated every trial runs with
TAG_ENERGY_PIN_NOTE = "precision_search.energy_pin_note"  # what pinned it and what a worker without it does
TAG_PARALLEL = "precision_search.parallel"  # trials in flight (this session)
TAG_CPUS_PER_TRIAL = "precision_search.cpus_per_trial"
TAG_GPUS_PER_TRIAL = "precision_search.gpus_per_trial"
TAG_RAY = "precision_search.ray"  # where trials ran, in words
TAG_STOPPED_EARLY = "precision_search.stopped_early"  # why the search ended before --trials
TAG_SEEDING = "precision_search.seeding"  # how the sensitivity table seeded the study, or why it did not
TAG_ALIAS_PREFIX = "precision_search.alias."  # + alias: "<registered model>/<version> (trial N)"

# Registered model / model version tags (pipeline.promotion).
TAG_EXPERIMENT = "precision_search.experiment"  # registered model: the experiment its versions come from
VTAG_RUN_ID = "precision_search.run_id"
VTAG_PLAN = "precision_search.plan"  # plan YAML (also the logged ONNX model's metadata key)
VTAG_PLAN_SUMMARY = "precision_search.plan_summary"
VTAG_POLICY = "precision_search.policy"
VTAG_ENGINE = "precision_search.tensorrt_engine"

# Child-run params and metrics written by pipeline.tracking.record.
PARAM_PLAN = "plan"  # plan summary
PARAM_LAYER_PREFIX = "layer."  # + layer name: its format


def param_key(name: str) -> str:
    """An MLflow-legal param/metric key for ``name``: MLflow allows only alphanumerics and ``_ - . : /``
    and spaces, while search parameters such as ``group:encoder.layer.*.attention.self.query``
    (``search.group_layers: role``) and user layer names may hold other characters; those become
    ``_`` (``*`` becomes ``all``, so a role group still reads as one), cut to MLflow's 250."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-.:/ ]", "_", name.replace("*", "all"))[:250]
METRIC_TRIAL_SECONDS = "trial_seconds"
METRIC_QAT_LOSS = "qat_loss"  # a QAT trial's training loss, one value per step (TrialResult.qat_curve)
METRIC_OBJECTIVE_PREFIX = "objective."  # + objective name: the exact value Optuna optimised

ROLE_STUDY = "study"
ROLE_TRIAL = "trial"

ARTIFACT_MODEL = "candidate"  # mlflow.onnx.log_model(name=ARTIFACT_MODEL) on each trial run
ARTIFACT_PLAN = "plan.yaml"
ARTIFACT_RESULT = "result.json"  # TrialResult.model_dump_json()
ARTIFACT_LAYERS = "layers.csv"  # per layer: format, execution, the kernel ORT runs, detail
ARTIFACT_ENGINE = "engine"  # TensorRT engine folder, where built
ARTIFACT_FRONT_TABLE = "pareto/front.csv"
ARTIFACT_FRONT_PLOT_PNG = "pareto/front.png"
ARTIFACT_FRONT_PLOT_SVG = "pareto/front.svg"  # renders in the artifact viewer; no multi-MB HTML
ARTIFACT_CONFIG = "config.yaml"  # on the parent run
ARTIFACT_FAIL_REASON = "fail_reason.txt"  # on failed child runs


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow 3 UI's name for classic (non-GenAI) experiments


def review_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page to review a study: its trials as a flat runs table (a filter on the trial role, so
    they are not folded under the parent run), front first (sorted by the ``pareto`` tag), in the model-training
    view (MLflow 3.17 reads ``workflowType`` from the URL before the browser's last choice)."""
    from urllib.parse import quote

    trials = quote(f"tags.`{TAG_ROLE}` = '{ROLE_TRIAL}'")
    query = f"workflowType=machine_learning&searchFilter={trials}&orderByKey={quote('tags.`pareto`')}&orderByAsc=false"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
