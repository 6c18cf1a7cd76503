# `make demo` and `make test` set up .venv themselves; `make setup` only does that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.ftmerge-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first (a range would pull a multi-GB CUDA build here), then the pinned set, then Unsloth without its
# declared dependencies (certifi pin unresolvable on this registry; torchvision breaks the CPU torch). Last, the fused
# merge's one-pass kernel, compiled into torch's extension cache (~/.cache/torch_extensions): without a C++ compiler
# and ninja the merge uses mergekit's own code, slower, and that line says so.
$(STAMP): pyproject.toml requirements/unsloth-deps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,lm-eval]'
	$(PIP) install -r requirements/unsloth-deps.txt
	$(PIP) install --no-deps unsloth==2026.10.9 unsloth-zoo==2026.10.9
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is not None)" \
		|| (echo "torchvision is installed in $(VENV); it breaks the CPU torch: pip uninstall torchvision" && exit 1)
	$(PY) -c "from pipeline.merging.kernel import status; print('merge kernel:', status())"
	touch $@

demo: setup
	$(PY) -m pipeline.demo

test: setup
	$(PY) -m ruff check pipeline tests bench
	$(PY) -m ruff format --check pipeline tests bench
	$(PY) -m pytest -q

# Benchmarks print ratios against the reference tools; each takes minutes and builds its models under /tmp.
bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/train.py
	$(PY) bench/apply.py
	$(PY) bench/merge.py
	$(PY) bench/search.py

clean:
	rm -rf runs .cache
