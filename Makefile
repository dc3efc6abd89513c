# One-command set-up: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BEAM_VENV := .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install venv-beam test test-beam lint bench bench-peers bench-analysis evaluate demo docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# tf_keras (legacy Keras 2, tested too) declares a dependency on the full `tensorflow` wheel; --no-deps keeps the
# environment on tensorflow-cpu alone.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[cpu,ann,plots,dev,docs]'
	$(BIN)/pip install --quiet regex rich 'kagglehub!=1.0.1' sentencepiece tokenizers
	$(BIN)/pip install --quiet --no-deps 'tf_keras>=2.16' 'keras-hub>=0.21'
	touch $(STAMP)

install: $(STAMP)

# Apache Beam needs protobuf < 7 (the main environment has 7.x): the [beam] extra gets its own environment. It holds
# only Beam, protobuf 6 and what they add; TensorFlow, Keras, numpy and scipy come from the main environment, whose
# site-packages a .pth file puts after its own (so its protobuf 6 wins). pip sees them installed and skips them.
PURELIB = -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
$(BEAM_STAMP): $(STAMP) setup.cfg pyproject.toml
	$(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/pip install --quiet --upgrade pip
	$(BIN)/python $(PURELIB) > "$$($(BEAM_VENV)/bin/python $(PURELIB))/zz-main-environment.pth"
	$(BEAM_VENV)/bin/pip install --quiet 'protobuf==6.33.*' 'apache-beam[tfrecord]==2.77.*' pytest
	$(BEAM_VENV)/bin/pip install --quiet --no-deps -e .
	$(BEAM_VENV)/bin/python -c "import google.protobuf as p, tensorflow, apache_beam; assert p.__version__ < '7', p.__version__"
	touch $(BEAM_STAMP)

venv-beam: $(BEAM_STAMP)

# The Beam environment installs, then its tests run, in the background while the main suite runs: the main suite's
# two workers leave part of the two cores idle (Python-bound steps, subprocess start-up), which the Beam job fills.
# Its output is shown after the main suite's.
test: $(STAMP)
	@( $(MAKE) --no-print-directory $(BEAM_STAMP) > $(BEAM_VENV).log 2>&1 || exit 2; \
	  $(BEAM_VENV)/bin/python -m pytest tests_beam -q > $(BEAM_VENV)-tests.log 2>&1 ) & beam=$$!; \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q; status=$$?; \
	wait $$beam; beam_status=$$?; \
	echo "--- Apache Beam tests (tests_beam, in $(BEAM_VENV)) ---"; \
	if [ $$beam_status -eq 2 ]; then cat $(BEAM_VENV).log; else cat $(BEAM_VENV)-tests.log; fi; \
	[ $$beam_status -eq 0 ] || status=1; \
	exit $$status

test-beam: $(BEAM_STAMP)
	$(BEAM_VENV)/bin/python -m pytest tests_beam -q

lint: $(STAMP)
	$(BIN)/ruff check influenciae tests tests_beam benchmarks
	$(BIN)/ruff format --check influenciae tests tests_beam benchmarks
	$(BIN)/mypy influenciae

bench: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py --output docs/benchmarks.md

# The peers (original Influenciae 0.3.0, Captum, pyDVL) each get their own virtual environment under .venv-peers/.
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/peers/run_peers.py --output docs/benchmarks.md

# Attacks, LRP and TCAV against Captum 0.9 on identical weights (reuses .venv-peers/captum).
bench-analysis: $(STAMP)
	$(BIN)/python benchmarks/peers/analysis.py --output docs/benchmarks.md

evaluate: $(STAMP)
	$(BIN)/python -m influenciae.evaluation.report --output docs/evaluation.md

demo: $(STAMP)
	$(BIN)/python -m influenciae.cli demo --output runs/demo

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(BEAM_VENV) .venv-peers site build *.egg-info .pytest_cache .mypy_cache .ruff_cache
