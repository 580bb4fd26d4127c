"""GRPO end to end on the synthetic sorting task: the held-out task reward rises above
the SFT policy's with no critic and no reward model, resume is bit-exact, and bad configs
fail with exit code 2."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import data_overrides, megarlhf, resume_after_crash
from tests.e2e.test_sft_rm import checkpoint_tensors, metrics

GRPO = "examples/grpo_tiny.yaml"


def grpo_args(task_data, sft, run_dir, *extra):
    run = [f"train.run_dir={run_dir}"] if run_dir else []
    return ["--config", GRPO, *data_overrides(task_data, "prompts_train", "prompts_test"), f"sft_model_path={sft}", *run, *extra]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_raises_heldout_reward(task_data, weak_sft, tmp_path, dtype):
    """examples/grpo_tiny.yaml (16 prompts x 8 responses, rule reward, beta 0.04), 30
    iterations; held-out prompts sampled with fixed seeds before and after. bfloat16:
    mixed precision from the float32 SFT policy (docs/precision.md)."""
    run_dir = tmp_path / "grpo"
    extra = ("train.max_steps=30", "train.eval_steps=30", f"model.params_dtype={dtype}")
    out = megarlhf("grpo", *grpo_args(task_data, weak_sft, run_dir, *extra))
    assert out.returncode == 0, out.stderr[-4000:]
    rows = metrics(run_dir)
    before = next(r for r in rows if r["step"] == 0)["eval/rule_score"]
    after = rows[-1]["eval/rule_score"]
    assert after > before + 0.05, (before, after)
    assert rows[-1]["objective/kl"] > 0 and rows[-1]["actor/steps"] == 4
    assert (run_dir / "plots" / "grpo.png").stat().st_size > 10_000


def test_grpo_resume_is_bit_exact(task_data, weak_sft, tmp_path):
    """4 iterations straight == crash after the iteration-2 checkpoint + `--resume auto`
    (RLOO, 2 iterations x 2 minibatches: sampling-time log-probs and the reference both used)."""
    common = grpo_args(
        task_data, weak_sft, None, "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=3",
        "train.global_batch_size=4", "grpo.num_generations=4", "grpo.num_mini_batches=1", "train.micro_batch_size=8",
        "grpo.num_iterations=2", "grpo.advantage_estimator=rloo", "data.eval_file=",
    )  # fmt: skip
    straight = tmp_path / "straight"
    out = megarlhf("grpo", *common, f"train.run_dir={straight}")
    assert out.returncode == 0, out.stderr[-4000:]

    crashed = tmp_path / "crashed"
    resume_after_crash("grpo", straight, crashed, 2, 4, common)

    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("objective/scores", "objective/kl", "policy/clipfrac", "policy/pg_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = checkpoint_tensors(straight / "checkpoints" / "iter_0000004" / "actor")
    wb = checkpoint_tensors(crashed / "checkpoints" / "iter_0000004" / "actor")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_grpo_bad_configs_exit_2(task_data, weak_sft, tmp_path):
    out = megarlhf("grpo", *grpo_args(task_data, weak_sft, tmp_path / "r", "grpo.num_generations=1"))
    assert out.returncode == 2
    assert "grpo.num_generations = 1: a group needs >= 2 samples" in out.stderr

    out = megarlhf("grpo", *grpo_args(task_data, weak_sft, tmp_path / "r", "grpo.num_mini_batches=3"))
    assert out.returncode == 2
    assert "do not split into grpo.num_mini_batches = 3 minibatches" in out.stderr

    out = megarlhf("grpo", *grpo_args(task_data, weak_sft, tmp_path / "r", "grpo.advantage_estimator=ppo"))
    assert out.returncode == 2
    assert "grpo.advantage_estimator" in out.stderr


def test_grpo_replay_reproduces_a_dumped_iteration(task_data, weak_sft, tmp_path):
    """train.dump_rollouts writes iteration 2's batch; `--replay-rollouts` on it, from the
    iteration-1 checkpoint, gives iteration 2's losses and actor again within 1e-6 without
    generating (RLOO, 2 iterations: the engine's log-probs from the dump are the old ones,
    a TIS correction weighs the loss)."""
    common = grpo_args(
        task_data, weak_sft, None, "train.global_batch_size=4", "grpo.num_generations=4", "grpo.num_mini_batches=1",
        "train.micro_batch_size=8", "grpo.num_iterations=2", "grpo.advantage_estimator=rloo", "data.eval_file=",
        "rollout_correction.mode=token_truncate",
    )  # fmt: skip
    straight = tmp_path / "straight"
    out = megarlhf("grpo", *common, f"train.run_dir={straight}", "train.max_steps=2", "train.save_steps=1", "train.dump_rollouts=2")
    assert out.returncode == 0, out.stderr[-4000:]
    dump = straight / "rollouts" / "iter_0000002.parquet"
    assert dump.is_file() and not (straight / "rollouts" / "iter_0000001.parquet").exists()

    import pyarrow.parquet as pq

    table = pq.read_table(dump).to_pydict()
    assert len(table["response_text"]) == 16 and table["policy_version"] == [1] * 16
    for column in ("prompt_text", "prompt_ids", "tokens", "mask", "scores", "rewards", "advantages",
                   "engine_logprobs", "trainer_logprobs", "is_weights"):  # fmt: skip
        assert column in table, column

    replay = tmp_path / "replay"
    out = megarlhf(
        "grpo", *common, f"train.run_dir={replay}", "train.max_steps=2",
        "--resume", str(straight / "checkpoints" / "iter_0000001"), "--replay-rollouts", str(dump),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "replaying" in out.stdout + out.stderr
    a, b = metrics(straight)[-1], metrics(replay)[-1]
    assert a["step"] == b["step"] == 2
    for key in ("objective/scores", "policy/pg_loss", "policy/clipfrac", "policy/approxkl", "actor/grad_norm",
                "rollout_correction/token_ratio_mean", "rollout_correction/is_weight_mean"):  # fmt: skip
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    wa = checkpoint_tensors(straight / "checkpoints" / "iter_0000002" / "actor")
    wb = checkpoint_tensors(replay / "checkpoints" / "iter_0000002" / "actor")
    w1 = checkpoint_tensors(straight / "checkpoints" / "iter_0000001" / "actor")
    assert max((wa[k] - w1[k]).abs().max().item() for k in wa) > 1e-5  # iteration 2 moved the actor
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
