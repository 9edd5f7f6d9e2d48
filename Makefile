# finetune-operator developer entry points. `make help` lists them.
# Every target sets up what it needs: a virtual environment cached outside the repo, keyed by
# the hash of pyproject.toml's [project] table (the dependencies; tool settings do not count),
# so a warm machine starts in seconds.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/finetune-operator
EXTRAS ?= operator,trainer,dev
comma := ,
VENV_KEY := $(shell sed -n '/^\[project\]/,/^\[tool\./p' pyproject.toml | sha256sum | cut -c1-12)-$(subst $(comma),-,$(EXTRAS))
VENV ?= $(CACHE_DIR)/venv-$(VENV_KEY)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help run venv lint fmt typecheck crds crds-check test test-unit test-fast cluster-up cluster-down

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.deps:  # the path holds the hash of the dependencies: a new set is a new venv
	@echo "==> creating $(VENV) with .[$(EXTRAS)]"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.deps ## Create the cached virtual environment and install this checkout into it
	@# Point the cached environment's editable install at this checkout (cheap, no dependencies).
	@$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . >$(VENV)/.relink.log 2>&1 \
		|| { cat $(VENV)/.relink.log; exit 1; }
	@echo "venv: $(VENV)"

run: venv ## The main job: fine-tune the tiny offline example on this machine (CPU or GPU)
	$(BIN)/finetune run examples/tiny-local.yaml $(RUN_ARGS)

lint: venv ## ruff lint + format check, import-linter contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

fmt: venv ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv ## mypy (strict on the pure modules)
	$(BIN)/mypy

crds: venv ## Regenerate crds/finetunejob.yaml from the spec model
	$(BIN)/finetune crd > crds/finetunejob.yaml

crds-check: venv ## Fail if the committed CRD differs from the generated one
	@diff -u crds/finetunejob.yaml <($(BIN)/finetune crd) && echo "crds: up to date"

test-unit: venv ## Pure unit tests only (seconds)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-fast: venv ## Inner loop: unit tests + the API-server tier (hack/cluster up --api-only), no e2e
	FINETUNE_TESTBED=api PATH="$(BIN):$$PATH" $(BIN)/pytest tests/unit tests/integration tests/hack $(PYTEST_ARGS)

test: lint typecheck crds-check ## The whole suite: quality gates, then every test tier
	PATH="$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

cluster-up: ## Start the local Kubernetes test bed (hack/cluster)
	hack/cluster up

cluster-down: ## Stop the local Kubernetes test bed
	hack/cluster down

.PHONY: chart chart-check
chart: crds ## Copy the CRD into the Helm chart and regenerate the Grafana dashboard JSON
	cp crds/finetunejob.yaml charts/finetune-operator/files/finetunejob.yaml
	$(BIN)/python charts/dashboard.py --write

chart-check: venv ## Fail if the chart's CRD copy or dashboard JSON is stale
	@diff -u crds/finetunejob.yaml charts/finetune-operator/files/finetunejob.yaml
	@diff -u charts/finetune-operator/dashboards/finetune-operator.json \
		<($(BIN)/python charts/dashboard.py) && echo "chart: up to date"
