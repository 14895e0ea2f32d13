# Two commands on a fresh machine with Python 3.11:
#   make demo   install into .venv, run the default pipeline (dvc repro), print the release summary
#   make test   install into .venv, run the test suite
VENV := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Stages run as `python -m stages.<name>` under DVC: the venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test bench keys clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first and pinned: this takes the local CPU wheel instead of a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	dvc repro
	quantbuild summary

test: install
	pytest

bench: install
	python bench/pipeline.py
	python bench/quantize.py speed
	python bench/quantize.py quality

# A signing key pair for bundles (keys/ is git-ignored; never commit the .key).
keys: install
	quantbuild keygen --out keys

clean:
	rm -rf artifacts
