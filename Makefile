# The README's commands. Everything installs itself: `make demo` and `make test` on a fresh clone.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo context figures lint format benchmarks clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make test` takes seconds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name streaming-repro --display-name "streaming-repro"
	touch $(STAMP)

# Two pytest-xdist workers, each running whole test files: most tests use one thread, so two share the 2 cores.
test: install
	$(PY) -m pytest -n 2 --dist loadfile

demo: install
	$(PY) -m repro run params/demo.yaml
	$(PY) -m repro.reporting.figures --summary figures

# The context task (params/context.yaml): streaming vs MIL where one patch cannot decide.
context: install
	$(PY) -m repro run params/context.yaml
	$(PY) -m repro.reporting.figures --summary figures

figures: install
	$(PY) -m repro run params/demo.yaml --only 05,06,07 --force

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmarks: install
	$(PY) benchmarks/streaming.py
	$(PY) benchmarks/train_streaming.py
	$(PY) benchmarks/mil.py
	$(PY) benchmarks/smoothgrad.py
	$(PY) benchmarks/bootstrap.py
	$(PY) benchmarks/learnability.py

clean:
	rm -rf runs
