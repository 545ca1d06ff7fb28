# pendo-event-router: `make help` lists the targets. `make run` and `make test` work on a fresh
# machine: they create .venv/, install the project into it and start the local Kafka broker.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/local.yaml
KAFKACTL := deploy/kafka/kafkactl
PYTEST_ARGS ?=
# `make run` with another KAFKA_PORT: the router must look for the broker kafka-start put there
# (unless ROUTER_KAFKA__BOOTSTRAP_SERVERS says otherwise).
RUN_ENV := $(if $(KAFKA_PORT),$(if $(ROUTER_KAFKA__BOOTSTRAP_SERVERS),,ROUTER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$(KAFKA_PORT)))

.DEFAULT_GOAL := help
.PHONY: help install run serve test check lint fmt typecheck unit integration bench \
        kafka-start kafka-stop kafka-status kafka-reset clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv/ and install the project with its dev tools

run: $(STAMP) kafka-start ## start local Kafka, the ingest and every sink consumer (CONFIG=config/local.yaml, KAFKA_PORT=19092); Ctrl-C stops them
	$(RUN_ENV) $(BIN)/router --config $(CONFIG) up

test: $(STAMP) lint typecheck ## lint, type-check and run every test (starts Kafka itself)
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP) ## run the unit tests only (no Kafka)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) ## run the tests on the real Kafka broker only
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP) ## format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP) ## mypy --strict on router and sinks
	$(BIN)/mypy

bench: $(STAMP) kafka-start ## run the ingest benchmark (writes a table for docs/benchmarks.md)
	$(BIN)/python bench/ingest_bench.py

kafka-start: ## start the local Kafka broker (KAFKA_PORT, default 19092) and wait until ready
	$(KAFKACTL) start

kafka-stop: ## stop the local Kafka broker started by kafka-start
	$(KAFKACTL) stop

kafka-status: ## is the local Kafka broker running and ready?
	$(KAFKACTL) status

kafka-reset: ## stop the local Kafka broker and delete its data
	$(KAFKACTL) reset

clean: ## remove the virtualenv, caches and build output (not Kafka data: see kafka-reset)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
