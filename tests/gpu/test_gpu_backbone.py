"""On a GPU: NCCL, bf16, Transformer Engine's spec when it imports, the CPU layer absent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarlhf.parallel import cpu_compat

REPO = Path(__file__).resolve().parents[2]


def test_cpu_layer_stays_out_on_gpu():
    assert cpu_compat.install() is False
    assert not cpu_compat.is_installed()


def test_selfcheck_on_gpu_matches_single_rank():
    nproc = min(2, torch.cuda.device_count())
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "megarlhf", "selfcheck"]
    if nproc == 2:
        args += ["--tp", "2"]
    out = subprocess.run(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK: the parallel layout reproduces the single-rank result." in out.stdout


def test_transformer_engine_spec_builds_when_available():
    pytest.importorskip("transformer_engine")
    from megarlhf.config import ModelConfig
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all

    init_distributed()
    groups = build_parallel_context({"actor": Layout(1, 1)})["actor"]
    seed_all(0, groups)
    model = build_model(ModelConfig(params_dtype="bfloat16", transformer_impl="transformer_engine"), groups).cuda()
    tokens = torch.randint(0, 256, (2, 16), device="cuda")
    out = model(tokens, torch.arange(16, device="cuda").expand(2, 16), None)
    assert out.shape == (2, 16, 256) and torch.isfinite(out.float()).all()
