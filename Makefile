# Two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv/ in the repository root and install everything from the package index.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kernelscale-installed
NT_VERSION := 0.6.5
DEMO_OUT ?= demo_out

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# neural-tangents without its declared tensorflow dependency (needed only by
	# neural_tangents.experimental, which kernelscale never imports).
	$(PY) -m pip install --quiet --no-deps "neural-tangents==$(NT_VERSION)"
	$(PY) -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('tensorflow') else 0)" \
	  || (echo "tensorflow must not be installed in $(VENV)"; exit 1)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kernelscale demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
