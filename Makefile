# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_ROOT ?= demo_data
RUN_DIR   ?= runs/patchcore_quickstart

.PHONY: demo lint test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hiad-pl demo-data --root $(DEMO_ROOT)
	$(VENV)/bin/hiad-pl tasks --config configs/patchcore_quickstart.yaml
	$(VENV)/bin/hiad-pl fit --config configs/patchcore_quickstart.yaml --run_dir $(RUN_DIR)
	$(VENV)/bin/hiad-pl test --config configs/patchcore_quickstart.yaml --run_dir $(RUN_DIR)

# ruff (style, imports, likely bugs) and mypy (types of src/hiad_pl), as configured in pyproject.toml
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) runs $(DEMO_ROOT) .pytest_cache
