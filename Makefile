# The commands of README.md and docs/index.md. `make test` and `make demo` do all the set-up on a fresh machine.
# Override the torch requirement for a GPU machine: `make test TORCH=torch` (pulls a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.scrimp-installed

.PHONY: install test test-all lint demo bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip >= 22.3 (`pip --python`) and setuptools >= 77 (SPDX license): tests/test_packaging.py builds and
	# installs the wheel offline with them.
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77"
	# torch first, on its own: a bare `torch` would pull a multi-GB CUDA build on a CPU machine.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m experiments.train

# The documentation site into site/ (mkdocs.yml; strict: a broken link or reference fails the build).
# tests/test_docs.py runs the same build inside `make test`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# GPU-only benchmarks (kernels, streamed zeroth-order) run only where CUDA is present.
bench: $(STAMP)
	@cuda=$$($(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))"); \
	for b in benchmarks/*.py; do \
	  case $$b in *kernels.py|*_gpu.py) [ "$$cuda" = 1 ] || { echo "== $$b: skipped (needs CUDA)"; continue; };; esac; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; \
	done

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache site
