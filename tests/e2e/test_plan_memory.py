"""The planner's memory model against a measured training step: tools/bench/memory_vs_plan.py at
TP2 under torchrun (a ~21M-parameter Llama, float32, Megatron DDP + Adam), every rank's
peak within 15% of the prediction, and each rank holding the predicted parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO


def test_predicted_memory_matches_a_measured_tp2_step(tmp_path):
    out_file = tmp_path / "mem.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "tools/bench/memory_vs_plan.py",
           "--tp", "2", "--steps", "2", "--json", str(out_file)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out_file.read_text().splitlines()[-1])
    assert result["layout"] == "tp2-pp1-dp1"
    predicted = result["predicted_MiB"]
    for rank in result["measured_MiB_per_rank"]:
        assert rank["rank_parameters"] == predicted["rank_parameters"]
        assert abs(rank["peak_rss_delta"] / predicted["total"] - 1) < 0.15, result
        assert abs(rank["peak_malloced_delta"] / predicted["total"] - 1) < 0.15, result
