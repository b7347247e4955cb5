# nbzoo — `make demo` runs every notebook on the demo preset; `make test` runs the whole test suite.
# Both create .venv and install into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where a CPU-only machine gets torch when no local wheel serves: the CPU wheel index, never the
# multi-GB CUDA build from PyPI. On a machine with an NVIDIA driver, PyPI's CUDA build is wanted.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# A torch wheel that pip finds locally (its find-links, constraints) is used as it is; LOCAL_TORCH
# prints its path, or fails. uv installs it and the other ~160 packages (pip remains the fallback).
# The venv starts without pip (ensurepip: 4 s of CPU); the system's pip installs uv into it, and uv
# installs pip from its cache (0.2 s); ensurepip where either fails (a Python without pip, no uv).
# Bytecode: without .pyc files (and with PYTHONDONTWRITEBYTECODE set, as on CI machines) every kernel
# start would recompile torch from source. nbzoo.bytecode compiles the ~4,800 modules the notebooks
# import, in two processes side by side (about 12 s of CPU each), instead of uv's --compile-bytecode
# of all ~17,700 (47 s).
TORCH_INDEX_ARGS := $(if $(shell command -v nvidia-smi 2>/dev/null),,--index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple)
LOCAL_TORCH = $(BIN)/python -m pip install --quiet --dry-run --ignore-installed --no-deps --no-index \
	--report - "torch==$(TORCH_VERSION)" 2>/dev/null | $(BIN)/python -c 'import json, sys, urllib.parse as u; \
	print(u.unquote(u.urlparse(json.load(sys.stdin)["install"][0]["download_info"]["url"]).path))'
UV_INSTALL = $(BIN)/uv pip install --python $(BIN)/python --quiet
PYTEST_ARGS ?=
# JupyterLab's settings for this environment: widget state saved with the notebook, so that a notebook
# saved in JupyterLab and reopened after its kernel stopped shows its widgets, not "model not found".
LAB_OVERRIDES := nbzoo/jupyterlab/overrides.json

.PHONY: install demo test lint format notebooks lab clean rehearse

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LAB_OVERRIDES)
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	test -x $(BIN)/uv || $(PYTHON) -m pip --python $(BIN)/python install --quiet uv \
		|| { $(BIN)/python -m ensurepip --default-pip >/dev/null && $(BIN)/python -m pip install --quiet uv; }
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(UV_INSTALL) pip \
		|| $(BIN)/python -m ensurepip --default-pip >/dev/null
	if wheel=$$($(LOCAL_TORCH)); then $(UV_INSTALL) "$$wheel" || $(BIN)/python -m pip install --quiet "$$wheel"; \
	else $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_INDEX_ARGS); fi
	$(UV_INSTALL) -e '.[dev]' || $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name nbzoo --display-name "Python (nbzoo)" >/dev/null
	install -D -m 644 $(LAB_OVERRIDES) $(VENV)/share/jupyter/lab/settings/overrides.d/nbzoo.json
	$(BIN)/python -m nbzoo.bytecode
	touch $@

demo: install
	$(BIN)/nbzoo demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-execute every notebook in place on the demo preset, so the committed outputs are current.
notebooks: install
	$(BIN)/nbzoo demo --in-place

# Every notebook's full (and full_8p) preset end to end on the CPU through its own code paths: stand-in
# checkpoints and data in the seeds' formats, downloaded from a mirror of the download hosts on
# 127.0.0.1 (nbzoo/rehearse.py says what it overrides and why); results/rehearse/*.json.
rehearse: install
	$(BIN)/python -m nbzoo.rehearse

lab: install
	$(BIN)/jupyter lab --ip 127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) results/*.ipynb checkpoints data build .pytest_cache
