# quari — developer entry points. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on local disk here; a bare `torch` could pull a
# multi-GB CUDA build. On a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# Fashion-MNIST: Debian's package when running as root with apt and the files are missing;
# otherwise `quari demo` finds its own copy ($QUARI_FASHION_MNIST, the cache) or downloads the
# official files and checks their sha256. DEMO_ARGS passes options: make demo DEMO_ARGS="--size full".
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

demo: install
	@if [ ! -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz ] && [ -z "$$QUARI_FASHION_MNIST" ] \
	    && [ ! -f "$$HOME/.cache/quari/fashion-mnist/t10k-labels-idx1-ubyte.gz" ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist …"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	    || echo "apt-get could not install it: quari demo downloads the official files instead"; \
	fi
	$(BIN)/quari demo $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis src/*.egg-info
