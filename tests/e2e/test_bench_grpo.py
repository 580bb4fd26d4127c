"""tools/bench/grpo_vs_trl.py end to end on the megarlhf side only (--skip-trl): it trains the
SFT policy it starts from, runs GRPO through the CLI with the rule reward and prints its
figures; with --rounds 2 it runs twice and shows the slower round (the lower median of
speed)."""

from __future__ import annotations

from tests.e2e.test_bench_ppo import LABELS, run_bench_skip_trl


def test_bench_grpo_prints_its_figures(task_data, tmp_path):
    ours = run_bench_skip_trl("grpo_vs_trl.py", tmp_path, [
        "--data-dir", str(task_data["tokenizer"].parent), "--sft-steps", "2",
        "--set", "train.global_batch_size=4", "--set", "grpo.num_generations=4",
        "--set", "grpo.num_mini_batches=1", "--set", "generation.response_length=8", "--rounds", "2",
    ], labels=(*LABELS, "sequences/s", "round 1: megarlhf", "round 2: megarlhf"))  # fmt: skip
    assert ours["optimizer_steps_per_iteration"] == 1
    seconds = [r["megarlhf_seconds_per_iteration"] for r in ours["rounds"]]
    assert len(seconds) == 2 and ours["seconds_per_iteration"] == max(seconds)
    assert ours["round_shown"] == 1 + seconds.index(max(seconds))
    assert 0 <= ours["per_iteration"][1]["rule_score"] <= 1
