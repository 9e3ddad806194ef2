# Every target sets up .venv on first use (and again when pyproject.toml changes).
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
PYTHON ?= python3
# bentoml build calls uv, dvc and torchrun are console scripts: the venv's bin comes first.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export BENTOML_DO_NOT_TRACK := true

.PHONY: run test serve lint compile clean browser bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/clipflow run

test: $(STAMP) lint browser
	$(BIN)/pytest -q --durations=30

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# tests/integration/test_page.py drives Debian's chromium through playwright (never playwright's own download).
browser:
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)

# Every benchmark in turn, each writing benchmarks/results/<name>.json (about three hours on 2 cores).
bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

serve: $(STAMP)
	$(BIN)/clipflow serve

compile: $(STAMP)
	$(BIN)/clipflow compile --output pipeline.yaml

clean:
	rm -rf outputs data mlartifacts mlflow.db bentoml_home pipeline.yaml
