# The two commands the README names: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint infra-check emulator run clean chaos chaos-long bench

setup: .venv/.installed node_modules/.installed .venv-infra/.installed .venv-worker/.installed

.venv/.installed: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The policy scanner has a venv of its own: checkov pins packaging<24, pytest 9 needs >=24.
.venv-infra/.installed: requirements-infra.txt
	python3 -m venv .venv-infra
	.venv-infra/bin/pip install --quiet --disable-pip-version-check -r requirements-infra.txt
	touch $@

# Python 3.13 for the real-worker contract test (tests/test_real_worker.py): pyenv's, else one on
# PATH. Without it the test is skipped, saying why (and the next `make setup` looks again).
PY313 := $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) \
  $(shell command -v python3.13 2>/dev/null))

.venv-worker/.installed: requirements.txt requirements-worker.txt
	if [ -n "$(PY313)" ] && "$(PY313)" -V >/dev/null 2>&1; then \
	  "$(PY313)" -m venv .venv-worker && \
	  grep -v '^azure-functions==' requirements.txt | .venv-worker/bin/pip install --quiet \
	    --disable-pip-version-check -r /dev/stdin -r requirements-worker.txt && touch $@; \
	else echo "no Python 3.13: tests/test_real_worker.py will be skipped"; fi

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

demo: setup
	$(PY) -m localdev.demo

# Coverage floor for retrain/: the whole suite stood at 94.7 %; the floor sits a point and a half
# below so timing-dependent paths (fault injection, e2e) cannot fail CI on noise. Here, not in
# pytest's addopts, so one layer can run alone (the unit layer alone covers 87 %).
COVERAGE := --cov=retrain --cov-report=term-missing:skip-covered --cov-fail-under=93

# In 5 processes (pytest-xdist): the end-to-end tests mostly wait on emulated queues and
# services, so on 2 cores they overlap well; work stealing hands a test queued behind a long
# one (the fault-injection mixes) to a process that is free.
test: setup
	$(PY) -m pytest -n 5 --dist worksteal $(COVERAGE)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/xenon --max-absolute C retrain  # no function in retrain/ above complexity grade C
	$(MAKE) --no-print-directory infra-check

# The Bicep template, offline: checkov's policies (skips justified in infra/.checkov.yaml; a
# file it cannot parse fails too), then the structural checks in tests/infra. Where Azure is
# reachable, also run `az bicep build` and `what-if` (README, Deploying to Azure).
infra-check: setup
	mkdir -p .localdev
	.venv-infra/bin/checkov --config-file infra/.checkov.yaml --directory infra -o json \
	  > .localdev/checkov.json || true
	$(PY) -m localdev.infracheck .localdev/checkov.json
	$(PY) -m pytest -q tests/infra

emulator: setup
	$(PY) -m localdev.amlemu --config localdev/emulator.example.json --port 8765

run: setup
	$(PY) -m localdev.runner --settings local.settings.json

chaos: setup
	$(PY) -m localdev.chaos --scenarios 12 --seed 1

# 504 scenarios as parallel shards (each with its own Azurite), then the sum. Most of a
# scenario is waiting (job deadlines, deploy leases), so shards beyond the core count help:
# `make chaos-long SHARDS=6` runs 6 x 84; `STORAGE=identity` runs the app without a key (on the
# OAuth Azurite, see docs/chaos.md).
SHARDS ?= 4
STORAGE ?= key
chaos-long: setup
	mkdir -p .localdev
	rm -f .localdev/chaos-*.json .localdev/chaos-*.log
	for i in $$(seq 1 $(SHARDS)); do $(PY) -m localdev.chaos --scenarios $$((504 / $(SHARDS))) \
	  --seed 3$$i --storage $(STORAGE) --json .localdev/chaos-$$i.json \
	  > .localdev/chaos-$$i.log 2>&1 & done; wait
	$(PY) -m localdev.chaos --merge .localdev/chaos-*.json

bench: setup
	$(PY) -m localdev.bench
	$(PY) -m localdev.v2bench

clean:
	rm -rf .venv .venv-infra node_modules .pytest_cache .mypy_cache .ruff_cache
