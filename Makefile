# Two commands set up a fresh machine: `make test` (install + lint + tests) and `make table1`
# (the main job). Both create .venv with the pinned torch when it is missing, from the first Python
# 3.10-3.13 on the PATH (python3, then python3.13 ... python3.10; scripts/find-python) or PYTHON=...
PYTHON ?=
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
ROOT ?= data
SEEDS ?= 0 1 2

.PHONY: install test lint table1 compare notebooks strip clean

$(VENV)/.installed: pyproject.toml Makefile scripts/find-python
	@if [ -x $(PY) ]; then \
	  echo "make: using the existing $(VENV) ($$($(PY) --version)); make clean to start from another Python"; \
	else \
	  py=$$(sh scripts/find-python $(PYTHON)) || exit 1; \
	  $$py -m venv $(VENV) || { echo "make: $$py -m venv failed; on Debian / Ubuntu install its venv" \
	    "package (e.g. python3.12-venv), or name another Python: make test PYTHON=..."; exit 1; }; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

# Two pytest-xdist workers, each module on one worker, the longest modules first (tests/conftest.py);
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# With CUDA: the paper preset. Without: the cpu preset for seed 0 (what a CPU can finish), said first.
table1: install
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) -m ltr table1 --root $(ROOT) --download --preset paper --seeds $(SEEDS); \
	else \
	  echo "No CUDA GPU here: running Table 1 with the cpu preset (ResNet-8, 70 stage-1 epochs, all 13 rows;"; \
	  echo "not WB's recipe) for seed 0 into exp/table1-cpu. On the reference 2-core CPU a seed took 26-28"; \
	  echo "minutes (exp/reference/cpu/wall_times.txt, 2026-11-24). The paper preset needs a GPU: scripts/gpu_reference.sh."; \
	  $(PY) -m ltr table1 --root $(ROOT) --download --preset cpu --seeds 0; \
	fi

compare: install
	$(PY) -m ltr compare --root $(ROOT) --download --preset paper --seeds $(SEEDS)

# Jupyter Lab with Jupytext (saving either file of a pair updates both) and nbstripout's git filter,
# so that outputs never reach a commit.
notebooks: install
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test,notebooks]'
	$(VENV)/bin/nbstripout --install
	$(VENV)/bin/jupyter lab notebooks/

# Bring each pair in step (the newer file of the pair wins), then strip outputs and execution counts.
strip: install
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
