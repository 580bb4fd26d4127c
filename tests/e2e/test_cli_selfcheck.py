"""The CLI end to end, as a user runs it: real processes, real torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc, *args):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *args])


def test_help_lists_commands():
    out = run([sys.executable, "-m", "megarlhf", "--help"])
    assert out.returncode == 0
    assert "quickstart" in out.stdout


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"], []], ids=["tp2", "pp2", "dp2"])
def test_selfcheck_two_ranks_matches_single_rank(layout):
    out = torchrun(2, "-m", "megarlhf", "selfcheck", "--steps", "1", *layout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK: the parallel layout reproduces the single-rank result." in out.stdout
    grad_diff = float(re.search(r"max \|grad diff\| ([0-9.e+-]+)", out.stdout).group(1))
    assert grad_diff < 1e-4


def test_impossible_layout_exits_2_with_a_message():
    out = run([sys.executable, "-m", "megarlhf", "selfcheck", "--tp", "3"])
    assert out.returncode == 2
    assert "tp*pp = 3*1 = 3 does not divide the world size 1" in out.stderr


def test_bench_forward_backward_prints_its_figures(tmp_path):
    out = run([
        sys.executable, "tools/bench/forward_backward.py", "--layers", "2", "--hidden", "64",
        "--heads", "4", "--seq", "32", "--vocab", "128", "--warmup", "1", "--steps", "1",
        "--json", str(tmp_path / "bench.json"),
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["tokens_per_step"] == 4 * 32
    assert figures["tokens_per_s"] > 0 and figures["matmul_peak_tflops"] > 0
    assert 0 < figures["fraction_of_peak"]


def test_quickstart_pipeline_on_two_ranks(tmp_path):
    """The README's first command, shortened: data -> tokenizer -> SFT -> RM -> PPO on DP2."""
    out = torchrun(
        2, "-m", "megarlhf", "quickstart", "--run-dir", str(tmp_path),
        "--sft-steps", "30", "--rm-steps", "10", "--ppo-steps", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RM held-out accuracy" in out.stdout
    assert re.search(r"PPO held-out task reward \(SFT -> PPO\)\s+[0-9.]+ -> [0-9.]+", out.stdout), out.stdout[-2000:]
    assert (tmp_path / "ppo" / "plots" / "ppo.png").is_file()
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / stage / "summary.json").is_file()
        assert (tmp_path / stage / "checkpoints" / "latest").is_file()
    first, last = re.search(r"SFT train loss \(first step -> last\)\s+([0-9.]+) -> ([0-9.]+)", out.stdout).groups()
    assert float(last) < float(first)
