# sdgen: two commands on a fresh machine.
#   make demo   set everything up and generate an image with the embedded model
#   make test   set everything up (test extras included) and run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a tranquil lake with the mountains at sunset

.PHONY: setup setup-test demo test test-fast test-full bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Exact pin: the CPU build. A looser pin would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[server,watermark]'
	# The invisible watermark without its GUI OpenCV requirement (the extra brings the headless one).
	$(BIN)/pip install --quiet --no-deps invisible-watermark==0.2.0
	# The compiled attention kernel for this CPU (AVX-512 BF16 and a C++ compiler; otherwise it
	# says why and the fast paths use PyTorch's operations).
	$(BIN)/python -m sdgen.runtime.kernels
	touch $@

setup-test: $(VENV)/.test-done

$(VENV)/.test-done: $(VENV)/.setup-done scripts/setup-test.sh
	bash scripts/setup-test.sh $(BIN)
	touch $@

demo: setup
	$(BIN)/sdgen generate "$(PROMPT)" --seed 42 --out outputs/

test: setup-test
	$(BIN)/python -m pytest -q -m "not full" tests

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not full and not slow" tests

test-full: setup-test
	$(BIN)/python -m pytest -q -m full tests

bench: setup-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
