# The README's commands. `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= seed
SET ?=
MLFLOW_PORT ?= 5000
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export VITFLOW_DATA_DIR ?=

PREFECT_PORT ?= 4200
export PREFECT_PORT MLFLOW_PORT

.PHONY: install run test test-scale-out ui serve stop status audit clean help

help:
	@echo "make run    run the seed study (CONFIG=seed|smoke|<path>, SET='train.epochs=2 ...')"
	@echo "make test   run the test suite"
	@echo "make ui     MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over the local store in mlflow/"
	@echo "make serve  Prefect server + MLflow server + work pool + deployments + worker on 127.0.0.1"
	@echo "make stop   stop exactly the processes 'make serve' started"

$(BIN)/vitflow: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# Prefect's local database (PREFECT_HOME), created now rather than by the first study's temporary API server:
	@# its migrations cost that study ~5 s on 2 cores. Already up to date: a no-op.
	$(BIN)/python -m prefect server database upgrade -y > /dev/null
	@touch $@

install: $(BIN)/vitflow

run: install
	$(BIN)/vitflow run --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Only the scale-out test (part of make test): Dask scheduler + 2 workers, MLflow server on a throw-away PostgreSQL.
test-scale-out: install
	$(BIN)/python -m pytest tests/test_scale_out.py $(PYTEST_ARGS)

ui: install
	MLFLOW_BIN=$(BIN)/mlflow mlflow/server.sh

serve: install
	scripts/stack.sh start

stop:
	scripts/stack.sh stop

status:
	scripts/stack.sh status

# --strict: a package pip-audit cannot audit (its vulnerability service unreachable) fails the audit.
audit: install
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --progress-spinner off --skip-editable --strict

clean:
	rm -rf models .pytest_cache

# The README's figures (docs/*.png), regenerated from a real seed study by scripts/readme_figures.py.
.PHONY: figures
figures: install
	$(BIN)/python scripts/readme_figures.py

# What bench/gpu_check.sh needs on the GPU machine (Python 3.12 and torch, no registry), git-ignored: .whl/, the
# runtime dependencies less torch/torchvision and what that image already has (see bench/wheelhouse.py), and
# .mnist/, the four MNIST files xz-packed from the data root.
.PHONY: wheelhouse
wheelhouse: install
	$(BIN)/python bench/wheelhouse.py --dest .whl

# bench/gpu_check.sh on this CPU at toy sizes, in a Python 3.12 environment like the GPU image (PYTHON312=...).
.PHONY: gpu-rehearsal
gpu-rehearsal: install
	bench/gpu_rehearsal.sh
