# precision-search — every target creates/refreshes the project's virtualenv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
# The test suite covers Keras/TFLite and the MiniLM example too, so it installs their extras.
TEST_EXTRAS ?= dev,keras,examples,cluster
CONFIG ?= search_spaces/digits_mlp.yaml
TRIALS ?=
STUDY ?=
PARALLEL ?=
POLICY ?= knee
TRIAL ?=
RAY_ADDRESS ?=
MLFLOW_PORT ?= 5000
PROMOTE_ARGS ?=
SENSITIVITY_ARGS ?=
BENCH_ARGS ?=
MODEL ?=
# While `make cluster-up` has a cluster running, its addresses (Ray, PostgreSQL storage, MLflow server) are
# used by every target below; `make cluster-down` removes the file.
ifneq ($(wildcard cluster/.env),)
include cluster/.env
export RAY_AUTH_MODE PRECISION_SEARCH_STORAGE MLFLOW_TRACKING_URI
endif
export RAY_ADDRESS MLFLOW_PORT

comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),_,$(EXTRAS))

.PHONY: venv search front promote load sensitivity ui mlflow-server cluster-up cluster-down test bench bench-qat bench-search bench-peers gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

search: $(STAMP)
	$(BIN)/precision-search search --config $(CONFIG) $(if $(TRIALS),--trials $(TRIALS)) $(if $(STUDY),--study $(STUDY)) $(if $(PARALLEL),--parallel $(PARALLEL))

front: $(STAMP)
	$(BIN)/precision-search front --config $(CONFIG) $(if $(STUDY),--study $(STUDY))

promote: $(STAMP)
	$(BIN)/precision-search promote --config $(CONFIG) $(if $(STUDY),--study $(STUDY)) $(if $(TRIAL),--trial $(TRIAL),--policy $(POLICY)) $(PROMOTE_ARGS)

# Per-layer sensitivity (layer x format metric change on the artifact), table + heat-map, cached.
sensitivity: $(STAMP)
	$(BIN)/precision-search sensitivity --config $(CONFIG) $(SENSITIVITY_ARGS)

# Load the promoted model (MODEL=name@alias, default the config's registry name and alias) and run the eval set.
load: $(STAMP)
	$(BIN)/precision-search load $(MODEL) --config $(CONFIG)

# The MLflow UI on the store of CONFIG's workdir (PRECISION_SEARCH_WORKDIR overrides).
ui: $(STAMP)
	PRECISION_SEARCH_CONFIG=$(CONFIG) bash mlflow/ui.sh

mlflow-server: $(STAMP)
	bash mlflow/server.sh

# A local multi-node cluster (Ray head + CLUSTER_WORKERS workers, PostgreSQL, MLflow server), loopback only.
cluster-up:
	@$(MAKE) --no-print-directory venv EXTRAS=$(EXTRAS),cluster
	bash cluster/up.sh

cluster-down:
	bash cluster/down.sh

test:
	@$(MAKE) --no-print-directory venv EXTRAS=$(TEST_EXTRAS)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/formats.py

bench-qat: $(STAMP)
	$(BIN)/python benchmarks/qat_recovery.py

bench-search: $(STAMP)
	$(BIN)/python benchmarks/search_quality.py $(BENCH_ARGS)

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf .precision-search .pytest_cache
