# Atelier: the two commands are `make demo` and `make test`; everything else is a step of theirs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTO_OUT := api/python

.PHONY: install proto proto-check lint typecheck test bench demo deploy-check browser clean

# Three distributions, installed editable together: atelier-api (stubs), atelier (SDK + CLI), and
# atelier-server (this directory), whose dependencies name the other two.
$(STAMP): pyproject.toml api/python/pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ./api/python -e './clients/python[demo]' -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python tools/gen_proto.py --check

lint: $(STAMP)
	$(BIN)/ruff check services clients tests bench tools
	$(BIN)/buf lint
	$(BIN)/mypy services clients/python/atelier
	$(BIN)/lint-imports

deploy-check: $(STAMP)
	$(BIN)/python tools/deploy_check.py

# Headless Chromium + chromedriver from Debian's packages for tests/browser (no browser download).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: $(STAMP) proto-check lint deploy-check browser
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

demo: $(STAMP)
	$(BIN)/python -m atelier.demo

clean:
	rm -rf $(VENV) .pytest_cache demo-out
