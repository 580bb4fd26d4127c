"""On a GPU: tools/bench/rlhf_phases.py runs PPO, GRPO and DPO (bf16 on the device, Transformer
Engine's layer spec when installed) and its figures hold together: the phases add up to the
step, MFU is measured against the device's dense bf16 peak and lies in (0, 1), and peak
memory is the device's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_bench_rlhf_on_gpu(tmp_path, stage):
    cmd = [sys.executable, "tools/bench/rlhf_phases.py", "--stage", stage, "--model", "20m", "--steps", "3", "--warmup", "1",
           "--sft-steps", "5", "--rm-steps", "5", "--work-dir", str(tmp_path), "--json", str(tmp_path / "b.json")]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    fig = result["summary"]
    assert fig["phases_over_step"] == pytest.approx(1.0, abs=0.05)
    assert result["peak_flops"] > 1e14  # a dense bf16 tensor-core peak, not a CPU probe
    assert 0 < fig["mfu"] < 1
    assert 0 < result["peak_memory_mib_per_rank"][0] < 80 * 1024
