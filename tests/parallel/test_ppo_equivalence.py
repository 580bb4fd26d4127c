"""One PPO update on the same rollouts gives the same actor and critic at every layout.

`PPOTrainer.update` is everything after generation: reward-model and rule scores,
reference log-probs, actor log-probs, critic values, KL shaping, GAE, whitening, and
2 epochs x 2 minibatches of actor and critic optimizer steps, the actor's with the
PPO-ptx SFT term mixed in. The rollouts are fixed
token sequences (random responses, some ending in EOS), so the comparison measures the
trainer, not sampling. Oracle: the same update on one rank (world of 1, every role
TP1 PP1). The frozen reference and reward models sit at layouts *different* from the
actor's in the sharded cases ("separately sharded").

Adam's epsilon is 1e-4 for the reason given in test_engine_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import World

MODEL = [
    "model.arch=llama", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.vocab_size=32",
    "model.make_vocab_size_divisible_by=32", "model.max_seq_length=64",
]  # fmt: skip
ATOL = 2e-5
ROLLOUTS = 8


def make_assets(root: str) -> None:
    """Rank 0 writes the task data and tokenizer; every rank joins the collective saves of
    a random SFT policy and reward model (TP1)."""
    from pathlib import Path

    import torch.distributed as dist

    from megarlhf.checkpoint.dist_ckpt import save_model_weights
    from megarlhf.config import load_config
    from megarlhf.config.model import ModelConfig
    from megarlhf.data import train_sentencepiece, write_synthetic
    from megarlhf.models.backbone import build_model
    from tests.parallel.common import groups, reseed

    root = Path(root)
    if dist.get_rank() == 0:
        paths = write_synthetic(root / "data", seed=0, n_sft=10, n_pref_train=10, n_pref_test=10, n_prompts_train=64, n_prompts_test=8)
        train_sentencepiece([str(paths["tokenizer_corpus"])], str(root / "data" / "sp"), vocab_size=64)
    dist.barrier()
    cfg = load_config(ModelConfig, None, [m.split(".", 1)[1] for m in MODEL])
    g = groups(1, 1)
    reseed(7, g)
    save_model_weights(build_model(cfg, g, "lm"), g, root / "sft", "actor")
    save_model_weights(build_model(cfg, g, "value"), g, root / "rm", "reward")


def fixed_rollouts(trainer, n: int, items: list[dict] | None = None):
    """The first n prompts (or `items`), each followed by a random response of 1..12
    tokens; about two thirds end in EOS (the rest hit the length limit)."""
    g = torch.Generator().manual_seed(0)
    items = items or [trainer.prompts[i] for i in range(n)]
    eos, pad = trainer.tokenizer.eos_id, trainer.tokenizer.pad_id
    rows = []
    for i, it in enumerate(items):
        k = int(torch.randint(1, 13, (1,), generator=g))
        resp = torch.randint(4, trainer.vocab_size, (k,), generator=g)
        if i % 3:
            resp[-1] = eos
        rows.append((it["prompt_ids"], resp))
    t = max(len(p) + len(r) for p, r in rows)
    tokens = torch.full((n, t), pad, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, (p, r) in enumerate(rows):
        tokens[i, : len(p)] = p
        tokens[i, len(p) : len(p) + len(r)] = r
        mask[i, len(p) : len(p) + len(r)] = 1
    return trainer.rollout_batch(tokens, mask, items), items


def ppo_update_case(root: str, run_dir: str, overrides: list[str]):
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from megarlhf.config import PPOConfig, load_config
    from megarlhf.parallel import weights
    from megarlhf.trainers.ppo import PPOTrainer

    cfg = load_config(
        PPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prompts_train.jsonl",
            # Fixed (not sampled) rollouts: the old log-probs come from an actor forward pass.
            "data.max_length=24", "generation.response_length=12", "generation.old_logprobs=recompute",
            f"sft_model_path={root}/sft", f"reward_model_path={root}/rm",
            "reward_fn=megarlhf.data.synthetic:sort_reward_batch",
            "ppo.ptx_coef=0.5", f"ptx_file={root}/data/sft.jsonl",
            f"train.run_dir={run_dir}", f"train.global_batch_size={ROLLOUTS}", "train.micro_batch_size=2",
            "ppo.num_ppo_epochs=2", "ppo.num_mini_batches=2", "ppo.kl_coef=0.1",
            "optim.learning_rate=1e-3", "optim.adam_epsilon=1e-4", "optim.lr_scheduler_type=constant",
            "critic_optim.learning_rate=1e-3", "critic_optim.adam_epsilon=1e-4",
            "critic_optim.lr_scheduler_type=constant",
        ] + overrides,
    )  # fmt: skip
    trainer = PPOTrainer(cfg)
    counters.clear()  # torch.compile's, for this case only
    batch, items = fixed_rollouts(trainer, ROLLOUTS)
    before = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    metrics = trainer.update(batch, items)
    actor = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    critic = weights.gather_full_state(trainer.critic.module, trainer.ctx["critic"])
    trainer.run.close()
    if dist.get_rank() != 0:
        return None
    compiled = [m in trainer.compiled for m in (trainer.actor.model, trainer.critic.model, *trainer.frozen_models())]
    return {"before": before, "actor": actor, "critic": critic, "metrics": metrics, "compiled": compiled,
            "compiled_graphs": counters["stats"]["unique_graphs"]}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_assets")
    world = World(1)
    try:
        world.run(make_assets, str(root))
        reference = world.run(ppo_update_case, str(root), str(root / "run_single"), [])[0]
    finally:
        world.close()
    return root, reference


def _compare(result, reference):
    ref_actor, ref_critic = reference["actor"], reference["critic"]
    moved = max((ref_actor[k] - reference["before"][k]).abs().max().item() for k in ref_actor)
    assert moved > 1e-3, f"the update barely moved the actor ({moved:.2e}): the test would prove nothing"
    assert reference["metrics"]["ptx/loss"] > 0.1, "the ptx term did not take part"
    diff = {}
    for name, ref in (("actor", ref_actor), ("critic", ref_critic)):
        got = result[name]
        assert got.keys() == ref.keys()
        diff[name] = max((got[k] - ref[k]).abs().max().item() for k in ref)
    for key in ("objective/scores", "objective/kl", "val/vf_loss", "policy/clipfrac", "ptx/loss"):
        assert result["metrics"][key] == pytest.approx(reference["metrics"][key], abs=1e-5), key
    assert diff["actor"] < ATOL and diff["critic"] < ATOL, diff
    return diff


CASES_2 = {
    # actor layout; the reference / reward / critic / engine at others where noted
    "dp2": [],
    "actor_tp2_reward_tp1_reference_pp2": ["layout.tp=2", "reward_layout.tp=1", "reference_layout.tp=1", "reference_layout.pp=2"],
    "actor_pp2_reward_tp2_engine_tp2": ["layout.pp=2", "reward_layout.tp=2", "reward_layout.pp=1", "generation.tp=2"],
    "actor_tp2_critic_pp2": ["layout.tp=2", "critic_layout.tp=1", "critic_layout.pp=2"],
    "dp2_compiled_training": ["train.compile=true"],  # all four models' forwards through torch.compile
}


@pytest.mark.parametrize("case", sorted(CASES_2))
def test_ppo_update_matches_single_rank(world2, assets, tmp_path, case):
    root, reference = assets
    result = world2.run(ppo_update_case, str(root), str(tmp_path / "run"), CASES_2[case])[0]
    # Compiled: actor and critic (training and forward-only graphs), reference, reward model.
    assert result["compiled"] == [case == "dp2_compiled_training"] * 4
    assert (result["compiled_graphs"] >= 6) == (case == "dp2_compiled_training"), result["compiled_graphs"]
    _compare(result, reference)


def test_ppo_update_tp2_pp2_matches_single_rank(world4, assets, tmp_path):
    root, reference = assets
    overrides = ["layout.tp=2", "layout.pp=2", "reward_layout.tp=1", "reward_layout.pp=1", "reference_layout.tp=2", "reference_layout.pp=1"]
    result = world4.run(ppo_update_case, str(root), str(tmp_path / "run"), overrides)[0]
    _compare(result, reference)


def sampling_logprobs_case(root: str, run_dir: str, overrides: list[str]):
    """Rollouts from the trainer's own engine: the log-probs and entropies the engine
    kept while sampling (generation.old_logprobs=engine, the default) against one more
    forward pass of the actor at its training layout (=recompute)."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from megarlhf.config import PPOConfig, load_config
    from megarlhf.rollout.sampling import SamplingParams
    from megarlhf.trainers.ppo import PPOTrainer

    cfg = load_config(
        PPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prompts_train.jsonl",
            "data.max_length=24", "generation.response_length=12", "generation.temperature=0.7",
            "generation.top_p=0.9", f"sft_model_path={root}/sft", f"reward_model_path={root}/rm",
            f"train.run_dir={run_dir}", f"train.global_batch_size={ROLLOUTS}", "train.micro_batch_size=2",
        ] + overrides,
    )  # fmt: skip
    trainer = PPOTrainer(cfg)
    counters.clear()  # torch.compile's, for this case only
    items = [trainer.prompts[i] for i in range(ROLLOUTS)]
    batch = trainer.generate(items, SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9), salt=3)
    engine_lp, engine_ent = trainer.sampling_logprobs(batch)
    lp, ent = trainer.policy_logprobs(trainer.actor.model, trainer.ctx["actor"], batch)
    trainer.run.close()
    if dist.get_rank() != 0:
        return None
    return {"lp": (engine_lp - lp).abs().max().item(), "ent": (engine_ent - ent).abs().max().item(),
            "tokens": int(batch["mask"].sum()), "mean_lp": (lp.sum() / batch["mask"].sum()).item(),
            "compiled_graphs": counters["stats"]["unique_graphs"]}  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.forward_micro_batch_size=8"],
        ["layout.pp=2", "train.forward_micro_batch_size=3"],  # PP: 3 does not split the rows; 2 is used
        ["layout.tp=2"],
        ["layout.tp=2", "generation.cuda_graphs=true"],
        ["generation.compile=true"],  # DP2: each rank compiles its own decode step
    ],
    ids=["dp2_forward_mb8", "pp2_engine_copy_forward_mb3", "tp2", "tp2_fixed_shape_decode", "dp2_compiled_decode"],
)
def test_engine_logprobs_are_the_old_logprobs(world2, assets, tmp_path, overrides):
    root, _ = assets
    res = world2.run(sampling_logprobs_case, str(root), str(tmp_path / "run"), overrides)[0]
    assert res["tokens"] > 3 * ROLLOUTS and res["mean_lp"] < -0.05, res  # real, non-trivial samples
    assert res["lp"] < 1e-5 and res["ent"] < 1e-5, res
    assert (res["compiled_graphs"] > 0) == ("generation.compile=true" in overrides), res
