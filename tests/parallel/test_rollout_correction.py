"""The rollout correction on real rollouts from the trainer's own engine (float32).

One GRPO update (2 iterations x 2 minibatches, so the ratio moves off 1 and clips) on 4
prompts x 4 responses sampled by the rollout engine, old log-probs recomputed by the
actor so that the corrected and the uncorrected runs share their ratios:

- in float32 the engine's and the trainer's log-probs agree, so every IS weight is 1
  within 1e-5, and a TIS or MIS run updates the actor as the uncorrected run does
  (within 1e-6);
- with 10% of the engine's log-probs shifted by log 3 (ratio 1/3, outside [0.5, 2]), the
  masked fraction is 0.10 (+-0.01) and exactly the planted tokens get weight 0;
- the weights and metrics are the same with the actor at DP2 as at DP1 (they are computed
  on the whole replicated batch from log-probs gathered over the actor's ranks).
"""

from __future__ import annotations

import math

import pytest

from tests.parallel.harness import World
from tests.parallel.test_grpo_equivalence import GENERATIONS, OBJECTIVES, PROMPTS
from tests.parallel.test_ppo_equivalence import MODEL, make_assets


def correction_case(root: str, run_dir: str, overrides: list[str], plant: float = 0.0):
    import torch
    import torch.distributed as dist

    from megarlhf.config import GRPOConfig, load_config
    from megarlhf.parallel import weights
    from megarlhf.rollout.sampling import SamplingParams
    from megarlhf.trainers.grpo import GRPOTrainer

    cfg = load_config(
        GRPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prompts_train.jsonl",
            "data.max_length=24", "generation.response_length=12", "generation.old_logprobs=recompute",
            f"sft_model_path={root}/sft", "reward_fn=megarlhf.data.synthetic:sort_reward_batch",
            f"train.run_dir={run_dir}", f"train.global_batch_size={PROMPTS}", "train.micro_batch_size=2",
            f"grpo.num_generations={GENERATIONS}",
            "optim.learning_rate=1e-3", "optim.adam_epsilon=1e-4", "optim.lr_scheduler_type=constant",
        ] + OBJECTIVES["grpo"] + overrides,
    )  # fmt: skip
    trainer = GRPOTrainer(cfg)
    items = trainer.rollout_items([trainer.prompts[i] for i in range(PROMPTS)])
    batch = trainer.generate(items, SamplingParams(max_new_tokens=12, temperature=1.0), salt=5)
    planted = None
    if plant:
        live = batch["mask"].nonzero()  # [n, 2]
        pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(0))[: round(plant * len(live))]
        planted = live[pick]
        batch["engine_logprobs"][planted[:, 0], planted[:, 1]] += math.log(3.0)
    before = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    metrics = trainer.update(batch, items)
    actor = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    trainer.run.close()
    if dist.get_rank() != 0:
        return None
    return {
        "before": before, "actor": actor, "metrics": metrics, "mask": batch["mask"],
        "is_weights": batch["is_weights"], "planted": planted, "tokens": int(batch["mask"].sum()),
    }  # fmt: skip


MIS = ["rollout_correction.mode=token_mask", "rollout_correction.mask_low=0.5", "rollout_correction.mask_high=2.0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """DP1 results: uncorrected, TIS per sequence, MIS per token, MIS with a planted gap."""
    root = tmp_path_factory.mktemp("correction_assets")
    world = World(1)
    try:
        world.run(make_assets, str(root))
        cases = {
            "none": ([], 0.0),
            "sequence_truncate": (["rollout_correction.mode=sequence_truncate", "rollout_correction.cap=2.0"], 0.0),
            "token_mask": (MIS, 0.0),
            "planted": (MIS, 0.1),
        }
        out = {
            name: world.run(correction_case, str(root), str(root / f"run_{name}"), overrides, plant)[0]
            for name, (overrides, plant) in cases.items()
        }
    finally:
        world.close()
    return root, out


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_float32_weights_are_one_and_corrections_change_nothing(single):
    _, out = single
    base = out["none"]
    assert base["tokens"] > 3 * PROMPTS * GENERATIONS  # real, non-trivial samples
    assert _max_diff(base["actor"], base["before"]) > 5e-4  # the update moved the actor
    m = base["metrics"]
    # Measured on the uncorrected run too: the metrics are always on.
    assert abs(m["rollout_correction/token_ratio_mean"] - 1) < 1e-5 and m["rollout_correction/k3_kl"] < 1e-10
    assert m["rollout_correction/token_mult_prob_error"] < 1 + 1e-5
    for mode in ("sequence_truncate", "token_mask"):
        res = out[mode]
        live = res["mask"].bool()
        assert (res["is_weights"][live] - 1).abs().max().item() < 1e-5, mode
        assert res["metrics"]["rollout_correction/masked_fraction"] == 0.0
        for key in ("policy/pg_loss", "policy/clipfrac", "policy/kl", "actor/grad_norm"):
            # 1e-6 relative: grad_norm is ~8 here and weights 1 +- 1e-6 scale it by as much.
            assert res["metrics"][key] == pytest.approx(m[key], rel=1e-6, abs=1e-6), (mode, key)
        assert _max_diff(res["actor"], base["actor"]) < 1e-6, mode


def test_planted_gap_is_masked(single):
    _, out = single
    res = out["planted"]
    m = res["metrics"]
    assert m["rollout_correction/masked_fraction"] == pytest.approx(0.10, abs=0.01)
    assert m["rollout_correction/token_ratio_outside"] == pytest.approx(0.10, abs=0.01)
    w = res["is_weights"]
    planted = res["planted"]
    assert (w[planted[:, 0], planted[:, 1]] == 0).all()
    assert int((w[res["mask"].bool()] == 0).sum()) == len(planted)
    # The masked tokens left the loss: the update differs from the uncorrected one.
    assert _max_diff(res["actor"], out["none"]["actor"]) > 1e-5


def test_weights_at_dp2_equal_dp1(world2, single, tmp_path):
    root, out = single
    res = world2.run(correction_case, str(root), str(tmp_path / "run"), MIS, 0.1)[0]
    ref = out["planted"]
    # The same tokens masked; the kept weights equal up to float32 rounding (each layout
    # samples and recomputes its rows in other microbatches).
    assert res["is_weights"].shape == ref["is_weights"].shape
    assert (res["is_weights"] == 0).equal(ref["is_weights"] == 0)
    assert (res["is_weights"] - ref["is_weights"]).abs().max().item() < 1e-6
    for key, v in ref["metrics"].items():
        if key.startswith("rollout_correction/"):
            assert res["metrics"][key] == pytest.approx(v, rel=1e-5, abs=1e-6), key
    assert _max_diff(res["actor"], ref["actor"]) < 2e-5
