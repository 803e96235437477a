# nmjax: `make demo` runs the demo (dense vs 2:4 / transposable / Bi-Mask training on Fashion-MNIST), `make test` runs the test suite. Each sets up .venv first.
# The venv prefers Python 3.12 (the GPU machine's version, so CPU tests exercise the same
# jax/Pallas internals); any Python >= 3.11 works.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n auto

FIND_PYTHON := for c in "env PYENV_VERSION=3.12.1 python3.12" python3.12 python3.13 python3 python; do \
  $$c -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null && break; done

.PHONY: venv data demo test lint bench clean cusparselt-check

$(VENV)/.installed: pyproject.toml
	@py="$$($(FIND_PYTHON))"; \
	  if [ -z "$$py" ]; then echo "nmjax needs Python >= 3.11" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $$py"; \
	  test -x $(PY) || "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed

# Real offline datasets (Debian packages): Fashion-MNIST and the Python docs' sources. Where
# apt-get cannot run, nmjax.datasets falls back to scikit-learn's digits and the stdlib's
# sources, and says so.
DEB_DATA := dataset-fashion-mnist python3-doc
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] && ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1; then \
	  echo "datasets: Fashion-MNIST and the Python docs are installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "datasets: installing Debian's $(DEB_DATA)"; \
	  ( DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(DEB_DATA) >/dev/null 2>&1 || \
	    ( $$SUDO apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(DEB_DATA) >/dev/null 2>&1 ) ) || \
	  echo "datasets: could not install $(DEB_DATA); falling back to scikit-learn's digits and the stdlib sources"; \
	else \
	  echo "datasets: no apt-get here; falling back to scikit-learn's digits and the stdlib sources"; \
	fi

demo: venv data
	$(PY) examples/demo.py

test: venv data
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
