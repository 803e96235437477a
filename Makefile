# nmjax: `make demo` runs the demo (masks for a model, then dense vs 2:4 training), `make test` runs the test suite. Each sets up .venv first.
# The venv prefers Python 3.12 (the GPU machine's version, so CPU tests exercise the same
# jax/Pallas internals); any Python >= 3.11 works.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n auto

FIND_PYTHON := for c in "env PYENV_VERSION=3.12.1 python3.12" python3.12 python3.13 python3 python; do \
  $$c -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null && break; done

.PHONY: venv demo test lint bench clean cusparselt-check

$(VENV)/.installed: pyproject.toml
	@py="$$($(FIND_PYTHON))"; \
	  if [ -z "$$py" ]; then echo "nmjax needs Python >= 3.11" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $$py"; \
	  test -x $(PY) || "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py
	$(PY) benchmarks/train.py --steps 300

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check nmjax tests benchmarks examples notebooks

# Build the cuSPARSELt FFI handler (fresh), load it, register it and lower both products for
# CUDA; no GPU needed (the GPU run is benchmarks/gpu_cusparselt.py).
cusparselt-check: venv
	$(PY) -m pip install -q -e ".[cusparselt]"
	$(PY) -m nmjax.kernels.cusparselt check --force

bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/masks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
