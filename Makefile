# The README's commands. `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= seed
SET ?=
MLFLOW_PORT ?= 5000
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export VITFLOW_DATA_DIR ?=

.PHONY: install run test ui clean help

help:
	@echo "make run    run the seed study (CONFIG=seed|smoke|<path>, SET='train.epochs=2 ...')"
	@echo "make test   run the test suite"
	@echo "make ui     MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over the local store in mlflow/"

$(BIN)/vitflow: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/vitflow

run: install
	$(BIN)/vitflow run --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --default-artifact-root $(CURDIR)/mlflow/artifacts \
		--workers 1

clean:
	rm -rf models .pytest_cache
