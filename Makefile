# Every target does its own set-up: a fresh clone needs only make and a python3 >= 3.11.
SHELL := /bin/bash
VENV := .venv
SAM_VENV := .venv-sam
SAM_CLI_VERSION := 1.170.0
# The Lambda runtime interface client, installed for python3.13 the way the Lambda image has it in /var/runtime.
RIC := .lambda-ric
RIC_VERSION := 4.2.2

# python3.13 (the Lambda runtime) when present, also as a pyenv version; else any python3 >= 3.11.
PYTHON ?= $(shell \
	versions="$$(pyenv versions --bare 2>/dev/null | tr '\n' ':')"; \
	if [ -n "$$versions" ]; then export PYENV_VERSION="$$versions"; fi; \
	for candidate in python3.13 python3.12 python3.11 python3; do \
		$$candidate -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null && break; \
	done)

# What the SAM CLI needs to work offline and leave $HOME alone (tests set the same).
SAM_ENV := SAM_CLI_TELEMETRY=0 AWS_EC2_METADATA_DISABLED=true PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: run upstream dev test lint build bench bench-quick mutate clean

$(VENV)/.installed: pyproject.toml layers/fanout/requirements.txt local/requirements-cli.txt
	@test -n "$(PYTHON)" || { echo "error: no python3 >= 3.11 found on PATH" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The SAM CLI pins its own pydantic, so it lives in a venv of its own.
$(SAM_VENV)/.installed:
	test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check aws-sam-cli==$(SAM_CLI_VERSION)
	touch $@

# Only with python3.13 (what sam build needs too); the tests that use it skip without it.
$(RIC)/.installed:
	if $(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then \
		$(PYTHON) -m pip install --quiet --disable-pip-version-check --only-binary=:all: --target $(RIC) awslambdaric==$(RIC_VERSION); \
	fi
	mkdir -p $(RIC) && touch $@

## make run: the three functions behind a local API Gateway on :3000, bundled upstream on :3001
run: $(VENV)/.installed
	$(VENV)/bin/python -m fanout_local.gateway $(ARGS)

## make upstream: the bundled upstream alone on :3001, on every interface (for `sam local` containers)
upstream: $(VENV)/.installed
	$(VENV)/bin/python -m fanout_local.upstream --host 0.0.0.0 --port 3001

## make dev: the app alone under uvicorn with reload (one process, default limits), upstream on :3001
dev: $(VENV)/.installed
	$(VENV)/bin/python -m fanout_local.upstream & trap "kill $$!" EXIT; \
	FANOUT_ALLOW_PRIVATE_NETWORKS=true $(VENV)/bin/uvicorn --factory fanout.app:create_app --reload --port 3000

## make test: lint, then every test (the SAM ones included); what CI runs
test: $(VENV)/.installed $(SAM_VENV)/.installed $(RIC)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	FANOUT_SAM_CLI="$(CURDIR)/$(SAM_VENV)/bin/sam" FANOUT_LAMBDA_RIC="$(CURDIR)/$(RIC)" $(SAM_ENV) $(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## make build: sam build (needs python3.13 on PATH)
build: $(SAM_VENV)/.installed $(VENV)/.installed
	$(SAM_ENV) $(SAM_VENV)/bin/sam build

$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

## make bench: every figure in benchmarks/results/ from one run (about 30 minutes: strategies, service, politeness, jobs)
bench: $(VENV)/.bench-installed $(SAM_VENV)/.installed
	cd benchmarks && FANOUT_SAM_CLI="$(CURDIR)/$(SAM_VENV)/bin/sam" $(SAM_ENV) ../$(VENV)/bin/python run.py

## make bench-quick: the same with N in {10, 1000} and fewer candidates
bench-quick: $(VENV)/.bench-installed $(SAM_VENV)/.installed
	cd benchmarks && FANOUT_SAM_CLI="$(CURDIR)/$(SAM_VENV)/bin/sam" $(SAM_ENV) ../$(VENV)/bin/python run.py --quick

## make mutate: mutation score of the guard, the engine and the batch runner against their tests
mutate: $(VENV)/.installed
	$(VENV)/bin/python tools/mutate.py

clean:
	rm -rf $(VENV) $(SAM_VENV) $(RIC) .aws-sam .pytest_cache .ruff_cache
