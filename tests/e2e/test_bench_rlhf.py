"""tools/bench/rlhf_phases.py end to end: it prepares what the stage starts from, runs the stage in
a torchrun world and prints per-phase figures that add up to the step time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO


def bench(tmp_path, *args):
    cmd = [sys.executable, "tools/bench/rlhf_phases.py", "--work-dir", str(tmp_path), "--steps", "2", "--warmup", "1",
           "--sft-steps", "2", "--rm-steps", "2", "--json", str(tmp_path / "bench.json"), *args]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / "bench.json").read_text())


def test_bench_rlhf_ppo_phases_add_up(tmp_path):
    stdout, result = bench(
        tmp_path, "--stage", "ppo", "--set", "train.global_batch_size=16", "--set", "generation.response_length=8",
        "--set", "ppo.num_ppo_epochs=1", "--set", "train.micro_batch_size=8",
    )  # fmt: skip
    fig = result["summary"]
    assert set(fig["phases"]) >= {"generate", "score/reward", "score/reference", "score/actor", "score/critic",
                                  "advantages", "train/actor", "train/critic", "refit"}  # fmt: skip
    assert fig["phases_over_step"] == pytest.approx(1.0, abs=0.05)
    step = result["per_step"][1]
    assert step["samples"] == 16 and 0 < step["generated_tokens"] <= 16 * 8
    # Training is 3 forwards per trained row (the reference has the policy's shape), and
    # the actor trains once (1 epoch); the old log-probs cost no forward (the engine's).
    assert step["flops"]["train/actor"] == pytest.approx(3 * step["flops"]["score/reference"])
    assert "score/actor" not in step["flops"] and fig["phases"]["score/actor"]["seconds"] < 0.01
    assert 0 < fig["mfu"] < 1 and result["peak_memory_mib_per_rank"][0] > 100
    assert "within 5%" in stdout and "MFU" in stdout


def test_bench_rlhf_dpo_two_ranks(tmp_path):
    stdout, result = bench(tmp_path, "--stage", "dpo", "--nproc", "2", "--set", "layout.tp=2")
    assert result["settings"]["world_size"] == 2 and len(result["peak_memory_mib_per_rank"]) == 2
    step = result["per_step"][1]
    # TP ranks hold the same rows: counted once, so samples = the global batch of pairs.
    from megarlhf.config import DPOConfig, load_config

    cfg = load_config(DPOConfig, REPO / "examples/dpo_tiny.yaml", [])
    assert step["samples"] == cfg.train.global_batch_size
    assert step["flops"]["train"] == pytest.approx(3 * step["flops"]["reference"])
    assert "within 5%" in stdout
