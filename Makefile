# exforge — the two commands: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# cyclonedx-py (make sbom, its test) in an environment of its own, as in deploy/Dockerfile:
# its schema-validation extras make jsonschema build rfc3987-syntax's parsers whenever it is
# imported, ~2 s of CPU in every exforge process (mistral-common imports jsonschema)
SBOM_TOOL := $(VENV)/sbom-tool
DEMO_DATA := .data/demo

.PHONY: demo test install elixir postgresql bench-check lint audit bandit-baseline sbom format schemas clean help

help:
	@echo "make demo    — set up, run the pipeline on the sample corpus, print dataset stats"
	@echo "make test    — set up and run the test suite"
	@echo "make bench-check — the CI benchmark subset against benchmarks/baselines/"
	@echo "make lint    — ruff, the import-layer contract, bandit, the dependency audit"
	@echo "make sbom    — CycloneDX SBOM of the worker image's Python packages (dist/)"
	@echo "make schemas — regenerate schemas/json from the record models"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "exforge needs Python >= 3.11 (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,train,serve,postgres]'
	$(PYTHON) -m venv $(SBOM_TOOL)
	$(SBOM_TOOL)/bin/pip install --quiet "cyclonedx-bom>=5"
	touch $(STAMP)

install: $(STAMP)

# Elixir (for analysis checks and evaluation) and bubblewrap (the evaluation sandbox),
# from the distribution's packages.
elixir:
	@{ command -v elixir && command -v bwrap; } >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq elixir bubblewrap >/dev/null; }
	@elixir --version | tail -n 1

demo: install elixir
	rm -rf $(DEMO_DATA)
	EXFORGE_DATA_DIR=$(DEMO_DATA) $(BIN)/exforge demo

# PostgreSQL's server programs (the tests start their own throwaway cluster on a free
# loopback port), from the distribution's packages. The package's own cluster is not used.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }
	@ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1 || command -v initdb

# Two xdist workers, as many as the CI machine's cores: most tests wait on another process
# (a worker, a VM, a server) much of the time. A module's tests stay on one worker, so its
# module-scoped fixtures (a 2-rank FSDP launch, the corpus judged by Elixir) run once.
TEST_WORKERS ?= 2

test: install elixir postgresql
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The CI benchmark subset: a training step, chunked head loss against full logits, judged
# against the committed baseline; fails only on a move beyond the measured spread.
bench-check: install
	$(BIN)/python benchmarks/train_step.py --repeats 5 --out .data/bench/train_step.json
	$(BIN)/exforge bench compare benchmarks/baselines/train_step_cpu.json .data/bench/train_step.json

SECURITY := deploy/security
BANDIT   := $(BIN)/bandit -q -c pyproject.toml -r exforge streams serving workers schemas deploy

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BANDIT) -b $(SECURITY)/bandit-baseline.json
	$(MAKE) --no-print-directory audit

# pip-audit, strict, over every installed distribution against the committed OSV snapshot
# (deploy/security/README.md says why and how to refresh it; AUDIT_SERVICE=osv|pypi: online).
AUDIT_SERVICE ?= snapshot
audit: install
	$(BIN)/python $(SECURITY)/audit.py --service $(AUDIT_SERVICE)

# After reviewing new findings (and adding them to deploy/security/README.md's table).
bandit-baseline: install
	$(BANDIT) -f json -o $(SECURITY)/bandit-baseline.json || true
	$(BIN)/python -c 'import json, sys; p = sys.argv[1]; r = json.load(open(p))["results"]; \
		open(p, "w").write(json.dumps({"results": r}, indent=1, sort_keys=True) + "\n")' \
		$(SECURITY)/bandit-baseline.json

# The worker image's package set (.[postgres], as deploy/Dockerfile installs it) in a
# throwaway environment, described by cyclonedx-py.
SBOM_ENV := .data/sbom-env
sbom: install
	rm -rf $(SBOM_ENV) && $(PYTHON) -m venv $(SBOM_ENV)
	$(SBOM_ENV)/bin/pip install --quiet '.[postgres]'
	mkdir -p dist
	$(SBOM_TOOL)/bin/cyclonedx-py environment --output-reproducible --of JSON \
		-o dist/exforge-worker.cdx.json $(SBOM_ENV)/bin/python
	rm -rf $(SBOM_ENV)
	@echo "dist/exforge-worker.cdx.json"

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schemas: install
	$(BIN)/python -m schemas.jsonschema

clean:
	rm -rf $(VENV) .data .pytest_cache .ruff_cache *.egg-info
