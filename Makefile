# Two entry points for a fresh machine (see README.md):
#   make demo   - build the environment and run the MiniCanvas demo
#   make test   - build the environment and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch only if missing: a user's existing build is kept; a fresh venv gets the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m sae_core demo

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
