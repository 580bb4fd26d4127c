"""One GRPO update on the same rollouts gives the same actor at every layout.

`GRPOTrainer.update` is everything after generation: reward-model and rule scores,
reference and sampling-time log-probs, group-relative advantages, and the clipped policy
loss with the KL term over num_iterations x minibatches of optimizer steps. The rollouts
are fixed token sequences (4 prompts x 4 responses each, random responses, some ending in
EOS), so the comparison measures the trainer, not sampling. Oracle: the same update on one
rank (world of 1, every role TP1 PP1).

Two objectives: "grpo" (std-scaled group advantages, 2 iterations x 2 minibatches so the
ratio moves off 1 and clips, sequence-level aggregation, clip-higher, beta x k3 KL loss
to a reference at its own layout, missing-EOS penalty, truncated responses masked) and
"rloo_on_policy" (leave-one-out baseline, CISPO's objective, one step, no reference: the
training pass's own log-probs are the old ones), and "reinforce_pp_baseline" (group-centred
scores, k1 KL to the reference in the per-token reward, returns normalised over the whole
batch, groups of equal rewards filtered out, SAPO's objective with sequence aggregation).
"""

from __future__ import annotations

import pytest

from tests.parallel.harness import World
from tests.parallel.test_ppo_equivalence import MODEL, fixed_rollouts, make_assets

ATOL = 2e-5
PROMPTS, GENERATIONS = 4, 4

OBJECTIVES = {
    "grpo": [
        "grpo.advantage_estimator=grpo", "grpo.num_iterations=2", "grpo.num_mini_batches=2",
        "grpo.loss_aggregation=sequence", "grpo.epsilon_high=0.28", "grpo.beta=0.1",
        "grpo.missing_eos_penalty=0.5", "grpo.mask_truncated_completions=true",
    ],
    "rloo_on_policy": [
        "grpo.advantage_estimator=rloo", "grpo.beta=0", "grpo.loss_aggregation=token", "grpo.policy_loss=cispo",
    ],
    "reinforce_pp_baseline": [
        "grpo.advantage_estimator=reinforce_pp_baseline", "grpo.beta=0.1", "grpo.kl_estimator=k1",
        "grpo.filter_groups=true", "grpo.policy_loss=sapo", "grpo.loss_aggregation=sequence",
    ],
}  # fmt: skip


def grpo_update_case(root: str, run_dir: str, overrides: list[str]):
    import torch.distributed as dist

    from megarlhf.config import GRPOConfig, load_config
    from megarlhf.parallel import weights
    from megarlhf.trainers.grpo import GRPOTrainer

    cfg = load_config(
        GRPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prompts_train.jsonl",
            # Fixed (not sampled) rollouts: the old log-probs come from an actor forward pass.
            "data.max_length=24", "generation.response_length=12", "generation.old_logprobs=recompute",
            f"sft_model_path={root}/sft", f"reward_model_path={root}/rm",
            "reward_fn=megarlhf.data.synthetic:sort_reward_batch",
            f"train.run_dir={run_dir}", f"train.global_batch_size={PROMPTS}", "train.micro_batch_size=2",
            f"grpo.num_generations={GENERATIONS}",
            "optim.learning_rate=1e-3", "optim.adam_epsilon=1e-4", "optim.lr_scheduler_type=constant",
        ] + overrides,
    )  # fmt: skip
    trainer = GRPOTrainer(cfg)
    items = trainer.rollout_items([trainer.prompts[i] for i in range(PROMPTS)])
    batch, items = fixed_rollouts(trainer, len(items), items)
    before = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    metrics = trainer.update(batch, items)
    actor = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    trainer.run.close()
    if dist.get_rank() != 0:
        return None
    return {"before": before, "actor": actor, "metrics": metrics}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_assets")
    world = World(1)
    try:
        world.run(make_assets, str(root))
        reference = {
            name: world.run(grpo_update_case, str(root), str(root / f"run_single_{name}"), overrides)[0]
            for name, overrides in OBJECTIVES.items()
        }
    finally:
        world.close()
    return root, reference


def _compare(result, reference, objective):
    ref = reference["actor"]
    moved = max((ref[k] - reference["before"][k]).abs().max().item() for k in ref)
    # One Adam step moves a parameter by up to ~lr (1e-3); 5e-4 means the gradient was real.
    assert moved > 5e-4, f"the update barely moved the actor ({moved:.2e}): the test would prove nothing"
    m, ref_m = result["metrics"], reference["metrics"]
    assert ref_m["actor/steps"] == (4 if objective == "grpo" else 1)
    if objective == "grpo":
        assert ref_m["policy/clipfrac"] > 0, "no token clipped: the clip path went untested"
        assert ref_m["policy/kl"] > 0, "the KL term did not take part"
    for key in ("objective/scores", "objective/reward_std", "policy/pg_loss", "policy/clipfrac", "actor/grad_norm"):
        assert m[key] == pytest.approx(ref_m[key], abs=1e-5), key
    assert result["actor"].keys() == ref.keys()
    diff = max((result["actor"][k] - ref[k]).abs().max().item() for k in ref)
    assert diff < ATOL, diff
    return diff


CASES_2 = {
    "dp2": [],
    "actor_tp2_reward_tp1_reference_pp2": ["layout.tp=2", "reward_layout.tp=1", "reference_layout.tp=1", "reference_layout.pp=2"],
    "actor_pp2_reward_tp2_engine_tp2": ["layout.pp=2", "reward_layout.tp=2", "reward_layout.pp=1", "generation.tp=2"],
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("case", sorted(CASES_2))
def test_grpo_update_matches_single_rank(world2, assets, tmp_path, case, objective):
    root, reference = assets
    overrides = OBJECTIVES[objective] + CASES_2[case]
    result = world2.run(grpo_update_case, str(root), str(tmp_path / "run"), overrides)[0]
    _compare(result, reference[objective], objective)


def test_grpo_update_tp2_pp2_matches_single_rank(world4, assets, tmp_path):
    root, reference = assets
    overrides = OBJECTIVES["grpo"] + ["layout.tp=2", "layout.pp=2", "reward_layout.tp=1", "reward_layout.pp=1"]
    result = world4.run(grpo_update_case, str(root), str(tmp_path / "run"), overrides)[0]
    _compare(result, reference["grpo"], "grpo")
