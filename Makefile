# Two commands set up a fresh machine: `make test` (install + lint + tests) and `make table1`
# (the main job). Both create .venv with the pinned torch when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
ROOT ?= data
SEEDS ?= 0 1 2

.PHONY: install test lint table1 compare notebooks strip clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

table1: install
	$(PY) -m ltr table1 --root $(ROOT) --download --preset paper --seeds $(SEEDS)

compare: install
	$(PY) -m ltr compare --root $(ROOT) --download --preset paper --seeds $(SEEDS)

notebooks: install
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test,notebooks]'
	$(VENV)/bin/jupyter lab notebooks/

strip: install
	$(PY) scripts/strip_notebooks.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
