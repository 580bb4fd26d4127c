"""DPO end to end on the synthetic task's preference pairs: the implicit reward of the
trained policy ranks held-out pairs correctly, and bad configs exit with code 2."""

from __future__ import annotations

import math

import pytest

from tests.e2e.conftest import data_overrides, megarlhf
from tests.e2e.test_sft_rm import metrics

DPO = "examples/dpo_tiny.yaml"


def test_dpo_ranks_heldout_pairs_and_wins_under_the_rule(task_data, weak_sft, tmp_path):
    """examples/dpo_tiny.yaml (DPO + RPO's NLL term), 60 steps: the implicit reward ranks
    held-out pairs, and the policy's sampled answers beat the SFT policy's under the task's
    rule (same seed per prompt for both). The reference's log-probs and answers are
    computed before training (precompute_ref_log_probs; the step-by-step reference gives
    the same losses, test below)."""
    run_dir = tmp_path / "dpo"
    out = megarlhf(
        "dpo", "--config", DPO, *data_overrides(task_data, "prefs_train", "prefs_test"),
        f"win_rate_prompts={task_data['prompts_test']}", f"init_from={weak_sft}", f"train.run_dir={run_dir}",
        "train.max_steps=60", "train.eval_steps=60", "precompute_ref_log_probs=true",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = metrics(run_dir)
    first, last = rows[0], rows[-1]
    # At step 1 the policy is the reference: every implicit reward is 0, the DPO loss log 2.
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["eval_rewards/accuracies"] >= 0.75, last
    assert last["eval_rewards/margins"] > 0.3, last
    assert last["eval_dpo/loss"] < 0.6, last
    assert last["eval_win_rate"] > 0.6, last
    assert last["eval_rule_score"] > last["eval_reference_rule_score"] + 0.1, last


def test_dpo_bad_configs_exit_2(task_data, weak_sft, tmp_path):
    common = ["dpo", "--config", DPO, *data_overrides(task_data, "prefs_train"), f"train.run_dir={tmp_path / 'r'}"]
    out = megarlhf(*common, f"init_from={weak_sft}", "beta=0")
    assert out.returncode == 2 and "beta = 0.0: must be > 0" in out.stderr
    out = megarlhf(*common, f"init_from={weak_sft}", "loss_type=ipo", "label_smoothing=0.1")
    assert out.returncode == 2 and "label_smoothing applies to loss_type sigmoid only" in out.stderr
    out = megarlhf(*common, "init_from=")
    assert out.returncode == 2 and "init_from is required" in out.stderr
    out = megarlhf(*common, f"init_from={weak_sft}", "reward_fn=")
    assert out.returncode == 2 and "win_rate_prompts needs reward_fn" in out.stderr
    out = megarlhf(*common, f"init_from={weak_sft}", "reference_layout.tp=2")
    assert out.returncode == 2 and "differs from the policy's layout: set precompute_ref_log_probs=true" in out.stderr


def test_dpo_steps_match_single_rank_at_tp2_pp2_dp2(task_data, weak_sft, tmp_path):
    """5 DPO steps (policy and its reference both sharded at TP2 or PP2) give the
    single-rank losses; so do reference log-probs precomputed at the reference's own
    layout (TP2 or PP2 under a DP2 policy, PP1 under a PP2 policy), policy and reference
    through torch.compile, and a precomputing run stopped after 3 steps and resumed, which
    reads them back from the run directory."""
    common = [
        "dpo", "--config", DPO, *data_overrides(task_data, "prefs_train"), "data.eval_file=", "win_rate_prompts=",
        f"init_from={weak_sft}", "train.max_steps=5", "optim.adam_epsilon=1e-4",
    ]  # fmt: skip
    out = megarlhf(*common, f"train.run_dir={tmp_path / 'single'}")
    assert out.returncode == 0, out.stderr[-4000:]
    reference = [r["loss"] for r in metrics(tmp_path / "single")]
    assert reference[-1] < reference[0] - 0.01  # it trains: the comparison means something
    precompute = "precompute_ref_log_probs=true"
    for name, layout in (
        ("tp2", ["layout.tp=2"]),
        ("pp2", ["layout.pp=2"]),
        ("dp2_precomputed_reference_tp2", [precompute, "reference_layout.tp=2"]),
        ("pp2_precomputed_reference_pp1", [precompute, "layout.pp=2", "reference_layout.pp=1"]),
        # forward-only microbatches of up to 64 pairs: at PP2 the largest even split (60) is used
        ("dp2_precomputed_reference_pp2", [precompute, "reference_layout.pp=2", "train.forward_micro_batch_size=64"]),
    ):
        out = megarlhf(*common, f"train.run_dir={tmp_path / name}", *layout, nproc=2)
        assert out.returncode == 0, out.stderr[-4000:]
        losses = [r["loss"] for r in metrics(tmp_path / name)]
        assert losses == pytest.approx(reference, abs=1e-5), name

    # train.compile (one rank): the policy's forward/backward and the in-step reference forward
    out = megarlhf(*common, f"train.run_dir={tmp_path / 'compiled'}", "train.compile=true")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "torch.compile: actor, reference" in out.stdout, out.stdout[-2000:]
    assert [r["loss"] for r in metrics(tmp_path / "compiled")] == pytest.approx(reference, abs=1e-5)

    run_dir = tmp_path / "precomputed_resumed"
    out = megarlhf(*common, f"train.run_dir={run_dir}", precompute, "train.max_steps=3")
    assert out.returncode == 0 and "reference log-probs of" in out.stdout, out.stderr[-4000:]
    out = megarlhf(*common, f"train.run_dir={run_dir}", precompute, "--resume", "auto")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "reference log-probs: read back from" in out.stdout
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx(reference, abs=1e-5)
