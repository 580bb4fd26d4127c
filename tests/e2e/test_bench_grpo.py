"""tools/bench_grpo.py end to end on the megarlhf side only (--skip-trl): it trains the
SFT policy it starts from, runs GRPO through the CLI with the rule reward and prints its
figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO


def test_bench_grpo_prints_its_figures(task_data, tmp_path):
    cmd = [
        sys.executable, "tools/bench_grpo.py", "--skip-trl", "--work-dir", str(tmp_path),
        "--data-dir", str(task_data["tokenizer"].parent), "--sft-steps", "2",
        "--iterations", "2", "--warmup", "1", "--threads", "1",
        "--set", "train.global_batch_size=4", "--set", "grpo.num_generations=4",
        "--set", "grpo.num_mini_batches=1", "--set", "generation.response_length=8",
        "--json", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("seconds / iteration (mean)", "sequences/s", "tokens/s (median of iterations)", "peak RSS (MiB)"):
        assert label in out.stdout, out.stdout[-2000:]
    assert "megarlhf per phase" in out.stdout

    figures = json.loads((tmp_path / "bench.json").read_text())
    ours = figures["megarlhf"]
    assert figures["trl"] is None
    assert ours["iterations"] == 2 and ours["timed_iterations"] == 1
    assert ours["optimizer_steps_per_iteration"] == 1
    assert 0 < ours["generated_per_iteration"] <= 16 * 8
    assert ours["total_tokens_per_second"] > 0 and ours["peak_rss_mib"] > 100
    # tokens/s is megarlhf's own throughput/tokens_per_second, rebuilt from its parts.
    row = ours["per_iteration"][1]
    assert row["tokens"] == row["generated"] + row["trained"]
    assert 0 <= row["rule_score"] <= 1
