# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first if it is absent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Caches of matplotlib, HF and torch.compile go into a run folder, not $HOME (`make clean` keeps it).
RUNTMP := $(CURDIR)/runs/.cache
export MPLCONFIGDIR := $(RUNTMP)/mpl
export HF_HOME := $(RUNTMP)/hf
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR := $(RUNTMP)/inductor
# `make test` runs the tests and notebooks (nbval) with IPython and Jupyter folders of its own, so that it writes nothing
# into $HOME; `make lab` keeps the user's Jupyter and IPython settings.
NB_ISOLATION := IPYTHONDIR=$(RUNTMP)/ipython JUPYTER_CONFIG_DIR=$(RUNTMP)/jupyter \
	JUPYTER_DATA_DIR=$(RUNTMP)/jupyter-data JUPYTER_RUNTIME_DIR=$(RUNTMP)/jupyter-runtime
# Jupyter refuses to run as root (e.g. in a container) without --allow-root.
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
# More options for `make lab` and `make tensorboard`: make lab ARGS="--no-browser --port 8899"
ARGS ?=

.PHONY: setup test lint demo lab tensorboard clean

setup: $(VENV)/.lcot-installed

# A machine whose python3 already has a CUDA torch keeps it (the venv sees system packages);
# elsewhere the CPU build torch==2.13.0 is installed (never torchvision: it breaks beside CPU torch).
$(VENV)/.lcot-installed: pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "setup: keeping the CUDA torch of python3"; python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	@touch $@

lint: setup
	$(PY) -m ruff check lcot tests benchmarks

test: setup lint
	$(NB_ISOLATION) $(PY) -m pytest -q tests
	$(NB_ISOLATION) $(PY) -m pytest -q --nbval-lax notebooks

# Quick local runs: the tests without those marked slow (over ~15 s on a CPU) or gpu; no lint, no notebooks.
.PHONY: test-fast test-gpu
test-fast: setup
	$(NB_ISOLATION) $(PY) -m pytest -q -m "not slow and not gpu" tests

# For a GPU machine: only the tests marked gpu (without a CUDA GPU each of them is skipped, see tests/conftest.py).
test-gpu: setup
	$(NB_ISOLATION) $(PY) -m pytest -q -m gpu tests

demo: setup
	$(PY) -m lcot.demo

lab: setup
	$(PY) -m jupyter lab --notebook-dir=notebooks $(LAB_ROOT) $(ARGS)

# The training runs' event files (python -m lcot.main ... --report_to tensorboard) under runs/.
tensorboard: setup
	$(PY) -m tensorboard.main --logdir runs/ $(ARGS)

# Every run under runs/, but not runs/.cache (the caches, and the Jupyter folders of `make test`).
clean:
	find runs -mindepth 1 -maxdepth 1 ! -name .cache -exec rm -rf {} + 2>/dev/null || true

# The only command that rewrites the committed figures/: every notebook (into figures/) and the demo (into
# figures/demo/). Runs (`make demo`, notebooks in JupyterLab, `make test`) write their figures into runs/ instead.
.PHONY: figures
figures: setup
	$(NB_ISOLATION) LCOT_FIGURES_DIR=$(CURDIR)/figures $(PY) -m pytest -q --nbval-lax notebooks
	$(PY) -m lcot.demo --figures figures/demo
