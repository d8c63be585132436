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

# Integration tests against a real ComfyUI (tests/comfy). COMFYUI_PATH is a ComfyUI source
# checkout outside this repository; COMFYUI_PYTHON is the interpreter of ComfyUI's own venv
# (with its requirements, pytest and `pip install -e <this repo> --no-deps`), by default the
# venv `comfy-venv` beside the checkout. See README.md, "Developing".
#   make test-comfy COMFYUI_PATH=/work/ComfyUI
COMFYUI_PATH   ?= ../ComfyUI
COMFYUI_PYTHON ?= $(abspath $(COMFYUI_PATH)/../comfy-venv/bin/python)
.PHONY: test-comfy
test-comfy:
	@test -f "$(COMFYUI_PATH)/nodes.py" || { echo "COMFYUI_PATH=$(COMFYUI_PATH) is not a ComfyUI checkout"; exit 2; }
	@test -x "$(COMFYUI_PYTHON)" || { echo "COMFYUI_PYTHON=$(COMFYUI_PYTHON) not found (ComfyUI's venv)"; exit 2; }
	COMFYUI_PATH="$(abspath $(COMFYUI_PATH))" OMP_NUM_THREADS=1 "$(COMFYUI_PYTHON)" -m pytest -q tests/comfy
