# Two entry points, each sets itself up from a bare Python: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# A CPU machine takes the CPU build of torch that ships on disk; with a GPU, pip resolves the CUDA build.
TORCH_CPU := torch==2.13.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?= -m "not gpu" -n 2 --durations=15

.PHONY: demo test lint bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
ifneq ($(HAS_CUDA),1)
	$(PIP) $(TORCH_CPU)
endif
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[demo,bnb]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/hf-eff demo $(DEMO_ARGS)

test: $(VENV)/.test
	$(PY) -m ruff check hf_eff tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) benchmarks/adapters.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
