"""PPO end to end on the synthetic sorting task: the held-out task reward rises above the
SFT policy's, the KL controller bounds the drift that beta = 0 lets run, resume is
bit-exact, and bad configs fail with exit code 2."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import data_overrides, megarlhf, resume_after_crash
from tests.e2e.test_sft_rm import checkpoint_tensors, metrics

PPO = "examples/ppo_tiny.yaml"


def ppo_args(task_data, sft, run_dir, *extra):
    """Rule reward only (no reward model); run_dir None = given later."""
    run = [f"train.run_dir={run_dir}"] if run_dir else []
    return [
        "--config", PPO, *data_overrides(task_data, "prompts_train", "prompts_test"),
        f"sft_model_path={sft}", "reward_model_path=", *run, *extra,
    ]  # fmt: skip


def test_ppo_raises_heldout_reward_and_kl_stays_bounded(task_data, weak_sft, tmp_path):
    """Rule reward only; held-out prompts decoded greedily before and after."""
    controlled, free = tmp_path / "adaptive", tmp_path / "beta0"
    common = ["train.max_steps=30", "train.eval_steps=30"]
    # examples/ppo_tiny.yaml's controller: beta 0.05, adaptive towards 1 nat, horizon 1000.
    out = megarlhf("ppo", *ppo_args(task_data, weak_sft, controlled, *common))
    assert out.returncode == 0, out.stderr[-4000:]
    rows = metrics(controlled)
    before = next(r for r in rows if r["step"] == 0)["eval/rule_score"]
    after = rows[-1]["eval/rule_score"]
    assert after > before + 0.05, (before, after)
    assert (controlled / "plots" / "ppo.png").stat().st_size > 10_000
    assert rows[-1]["objective/kl_coef"] != pytest.approx(0.05), "the adaptive controller never moved beta"

    out = megarlhf("ppo", *ppo_args(task_data, weak_sft, free, *common, "ppo.kl_coef=0", "ppo.adap_kl_ctrl=false"))
    assert out.returncode == 0, out.stderr[-4000:]
    kl_controlled = sum(r["objective/kl"] for r in rows[-5:]) / 5
    kl_free = sum(r["objective/kl"] for r in metrics(free)[-5:]) / 5
    assert kl_free > 2 * kl_controlled, (kl_free, kl_controlled)


def test_ppo_resume_is_bit_exact(task_data, weak_sft, tmp_path):
    """4 iterations straight == crash after the iteration-2 checkpoint + `--resume auto`."""
    common = ppo_args(
        task_data, weak_sft, None, "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=3",
        "train.global_batch_size=16", "train.micro_batch_size=8", "ppo.num_ppo_epochs=1", "data.eval_file=",
        "ppo.normalize_reward=true", "ppo.target=0.1", "ppo.horizon=100",
    )  # fmt: skip
    straight = tmp_path / "straight"
    out = megarlhf("ppo", *common, f"train.run_dir={straight}")
    assert out.returncode == 0, out.stderr[-4000:]

    crashed = tmp_path / "crashed"
    resume_after_crash("ppo", straight, crashed, 2, 4, common)

    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "val/vf_loss", "policy/clipfrac"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for role in ("actor", "critic"):
        wa = checkpoint_tensors(straight / "checkpoints" / "iter_0000004" / role)
        wb = checkpoint_tensors(crashed / "checkpoints" / "iter_0000004" / role)
        assert wa.keys() == wb.keys() and len(wa) > 10
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (role, k)


def test_ppo_bad_configs_exit_2(task_data, weak_sft, tmp_path):
    out = megarlhf("ppo", *ppo_args(task_data, weak_sft, tmp_path / "r", "reward_fn="))
    assert out.returncode == 2
    assert "no reward: set reward_model_path, reward_fn, or both" in out.stderr

    out = megarlhf("ppo", *ppo_args(task_data, weak_sft, tmp_path / "r", "train.global_batch_size=48"))
    assert out.returncode == 2
    assert "does not split over the actor's 1 data-parallel ranks x micro_batch_size 16" in out.stderr

    out = megarlhf("ppo", *ppo_args(task_data, weak_sft, tmp_path / "r", "reward_fn=megarlhf.data.synthetic:nope"))
    assert out.returncode == 2
    assert "has no callable 'nope'" in out.stderr

    out = megarlhf("ppo", *ppo_args(task_data, tmp_path / "missing", tmp_path / "r"))
    assert out.returncode == 3
