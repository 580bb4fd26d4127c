# Two commands on a fresh machine: `make quickstart` and `make test`.
# Both create/reuse a local virtualenv (.venv) idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megarlhf-installed
NPROC ?= 2
QUICKSTART_ARGS ?=
PYTEST_ARGS ?=

.PHONY: quickstart test docs install clean-venv

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

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# docs/config.md from the config dataclasses' field docstrings (tests/unit/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m megarlhf.config.docs

clean-venv:
	rm -rf $(VENV)
