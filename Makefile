# One-command set-up: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install test lint bench bench-peers evaluate demo docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# tf_keras (legacy Keras 2, tested too) declares a dependency on the full `tensorflow` wheel; --no-deps keeps the
# environment on tensorflow-cpu alone.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[cpu,ann,plots,dev,docs]'
	$(BIN)/pip install --quiet --no-deps 'tf_keras>=2.16'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

lint: $(STAMP)
	$(BIN)/ruff check influenciae tests benchmarks
	$(BIN)/ruff format --check influenciae tests benchmarks
	$(BIN)/mypy influenciae

bench: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py --output docs/benchmarks.md

# The peers (original Influenciae 0.3.0, Captum, pyDVL) each get their own virtual environment under .venv-peers/.
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/peers/run_peers.py --output docs/benchmarks.md

evaluate: $(STAMP)
	$(BIN)/python -m influenciae.evaluation.report --output docs/evaluation.md

demo: $(STAMP)
	$(BIN)/python -m influenciae.cli demo --output runs/demo

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .venv-peers site build *.egg-info .pytest_cache .mypy_cache .ruff_cache
