# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first if it is absent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Caches of matplotlib, IPython, Jupyter, HF and torch.compile go into a run folder, not $HOME.
RUNTMP := $(CURDIR)/runs/.cache
export MPLCONFIGDIR := $(RUNTMP)/mpl
export IPYTHONDIR := $(RUNTMP)/ipython
export JUPYTER_CONFIG_DIR := $(RUNTMP)/jupyter
export JUPYTER_DATA_DIR := $(RUNTMP)/jupyter-data
export JUPYTER_RUNTIME_DIR := $(RUNTMP)/jupyter-runtime
export HF_HOME := $(RUNTMP)/hf
export HF_HUB_OFFLINE := 1
export TORCHINDUCTOR_CACHE_DIR := $(RUNTMP)/inductor

.PHONY: setup test lint demo lab clean

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
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax notebooks

demo: setup
	$(PY) -m lcot.demo

lab: setup
	$(PY) -m jupyter lab --notebook-dir=notebooks

clean:
	rm -rf runs

# The only command that rewrites the committed figures/: every notebook (into figures/) and the demo (into
# figures/demo/). Runs (`make demo`, notebooks in JupyterLab, `make test`) write their figures into runs/ instead.
.PHONY: figures
figures: setup
	LCOT_FIGURES_DIR=$(CURDIR)/figures $(PY) -m pytest -q --nbval-lax notebooks
	$(PY) -m lcot.demo --figures figures/demo
