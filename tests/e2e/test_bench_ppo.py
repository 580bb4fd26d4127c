"""tools/bench/ppo_vs_trl.py end to end on the megarlhf side only (--skip-trl): it trains the
SFT and reward model it starts from, runs PPO through the CLI and prints its figures; and
the benchmarks refuse an unusable --trl-python before any run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO

LABELS = ("seconds / iteration (mean)", "tokens/s (median of iterations)", "peak RSS (MiB)")


def run_bench_skip_trl(script: str, tmp_path, args: list[str], labels=LABELS) -> dict:
    """Runs tools/bench/<script> --skip-trl for 2 iterations (1 timed) with `args`, checks the
    printed `labels`, the per-phase line and the figures ppo_vs_trl.py and grpo_vs_trl.py
    share; returns megarlhf's figures from its --json file."""
    cmd = [
        sys.executable, f"tools/bench/{script}", "--skip-trl", "--work-dir", str(tmp_path),
        "--iterations", "2", "--warmup", "1", "--threads", "1", *args, "--json", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in labels:
        assert label in out.stdout, out.stdout[-2000:]
    assert "megarlhf per phase" in out.stdout

    figures = json.loads((tmp_path / "bench.json").read_text())
    ours = figures["megarlhf"]
    assert figures["trl"] is None
    assert ours["iterations"] == 2 and ours["timed_iterations"] == 1
    assert 0 < ours["generated_per_iteration"] <= 16 * 8
    assert ours["total_tokens_per_second"] > 0 and ours["peak_rss_mib"] > 100
    # tokens/s is megarlhf's own throughput/tokens_per_second, rebuilt from its parts.
    row = ours["per_iteration"][1]
    assert row["tokens"] == row["generated"] + row["trained"]
    return ours


def test_bench_ppo_prints_its_figures(task_data, tmp_path):
    run_bench_skip_trl("ppo_vs_trl.py", tmp_path, [
        "--data-dir", str(task_data["tokenizer"].parent), "--sft-steps", "2", "--rm-steps", "2",
        "--set", "train.global_batch_size=16", "--set", "generation.response_length=8",
        "--set", "ppo.num_ppo_epochs=1",
    ])  # fmt: skip


def test_benchmarks_reject_a_trl_python_before_any_run(tmp_path):
    """A --trl-python that cannot run the TRL side stops the benchmark at once (exit 2, what
    to pass instead), before the minutes of megarlhf set-up and runs it would come after:
    a missing interpreter, and one whose imports fail."""
    without_trl = tmp_path / "python-without-trl"
    without_trl.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'trl'\" >&2\nexit 1\n")
    without_trl.chmod(0o755)
    for script in ("ppo_vs_trl.py", "grpo_vs_trl.py", "sft_rm_dpo_vs_trl.py"):
        for python, why in ((tmp_path / "no-python", "No such file"), (without_trl, "No module named 'trl'")):
            work = tmp_path / script
            out = subprocess.run(
                [sys.executable, f"tools/bench/{script}", "--trl-python", str(python), "--work-dir", str(work)],
                cwd=REPO, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert out.returncode == 2, out.stderr[-2000:]
            assert "--trl-python" in out.stderr and why in out.stderr, out.stderr[-2000:]
            if script != "sft_rm_dpo_vs_trl.py":  # the iteration benchmarks can run without TRL
                assert "--skip-trl" in out.stderr, out.stderr[-2000:]
            assert not work.exists()
