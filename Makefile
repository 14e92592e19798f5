# The way in. `make repro` and `make test` set everything up first; nothing else to install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UI_PORT ?= 5000

.PHONY: setup repro test test-fast ui iterations seeds results bench params clean-venv

setup: $(STAMP)  ## create .venv with the pinned dependencies (idempotent)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

repro: setup  ## download, train, evaluate on params.yaml
	$(BIN)/dvc repro

test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest

test-fast: setup  ## skip the tests marked slow
	$(BIN)/python -m pytest -m "not slow"

ui: setup  ## MLflow UI on this repo's store, local only
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments (open mnist-cnn > Training runs)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns --host 127.0.0.1 --port $(UI_PORT) --workers 1

params: setup  ## regenerate params.yaml from conf/ (dvc exp run does this itself)
	$(BIN)/python -c "from pathlib import Path; from dvc.utils.hydra import compose_and_dump; \
	compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), None, 'config', '.', [])"

clean-venv:
	rm -rf $(VENV)
