"""bf16 mixed precision at TP2, PP2, DP2 (plain and distributed optimizer) equals single-rank bf16.

bf16 parameters and activations, float32 main weights, float32 gradient buffers (micro-batch
accumulation and DP reduction) and float32 Adam moments; log-probs and losses in float32
from bf16 logits. Oracles: a naive mixed-precision loop on one rank (the SFT objective,
torch AdamW on float32 copies), and the single-rank PPO update / DPO step in bf16. Each
single-rank bf16 result is also computed in float32, which gives bf16's own rounding gap.

Tolerances (derived in docs/precision.md, section "Tolerances"):
- EXACT_FORWARD layouts (DP2, PP2, the distributed optimizer, cut into the oracle's
  micro-batches): every micro-batch's bf16 gradient is bitwise the oracle's; only the
  float32 summation order differs. Float32 main weights within MAIN_ATOL = 1e-6 (fp32
  rounding of the sums, at most x lr/eps = 10 through Adam); the bf16 parameters are
  exactly the main weights rounded, hence within one bf16 ulp of the oracle's.
- Layouts that change the bf16 arithmetic (TP: each rank's partial sum of a row-parallel
  matmul is rounded to bf16 before the all-reduce; PPO/DPO, whose micro-batches are
  grouped and padded per layout): the layout's main weights may not be further (L2, over
  all parameters) from single-rank bf16 than single-rank bf16 is from float32:
  ratio < 1. Losses within a relative 2^-8 (one bf16 rounding).
- Broken variant: gradients accumulated and reduced in bf16 (optim.grad_reduce_in_fp32 =
  false) at DP2 fails the EXACT_FORWARD check by more than 100x.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megarlhf.config import OptimConfig
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.parallel import weights
from tests.parallel.common import batch, groups, reseed, tiny_config
from tests.parallel.test_engine_equivalence import OPTIM, _nll

STEPS = 2
MAIN_ATOL = 1e-6
BF16_EPS = 2.0**-8


def main_weights(engine: TrainEngine) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The optimizer's float32 main weights, one full-size tensor per local parameter.

    Plain mixed-precision optimizer: `fp32_from_float16_groups` mirrors the bf16 params.
    Distributed optimizer: each DP rank holds a contiguous range of each parameter; the
    ranges are written into zeros and summed over DP (every element is owned once)."""
    params = list(engine.module.parameters())
    out = {p: torch.zeros(p.shape, dtype=torch.float32) for p in params}
    opts = getattr(engine.optimizer, "chained_optimizers", None) or [engine.optimizer]
    distributed = False
    for opt in opts:
        if hasattr(opt, "shard_fp32_from_float16_groups"):
            distributed = True
            pairs = [*zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                     *zip(opt.model_fp32_groups, opt.shard_fp32_groups)]  # fmt: skip
            for model_group, main_group in pairs:
                for p, main in zip(model_group, main_group):
                    r = opt._get_model_param_range_map(p)["param"]
                    out[p].view(-1)[r.start : r.end] = main.detach().view(-1)
        elif not hasattr(opt, "float16_groups"):  # float32 model: the parameters are the main weights
            for p in params:
                out[p].copy_(p.detach())
        else:
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p, main in zip(model_group, main_group):
                    out[p].copy_(main.detach())
    if distributed and engine.groups.layout.dp > 1:
        flat = torch.cat([out[p].view(-1) for p in params])
        dist.all_reduce(flat, group=engine.groups.dp)
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            out[p] = chunk.view(p.shape)
    return out


def _oracle(cfg, steps, clip, micro_batch_size):
    """Naive mixed precision on one rank: float32 main copies of the model's weights; each
    micro-batch's gradient (bf16 for a bf16 model) cast to float32 and summed; clipped;
    AdamW on the main weights, which are then rounded into the model. The global batch is
    cut into the same micro-batches as the layout under test cuts it (rank-major), since
    in bf16 each micro-batch's gradient is rounded once: its size is part of the result."""
    g = groups(1, 1)
    reseed(99, g)
    ref = build_model(cfg, g, "lm")
    init = {n: p.detach().float().clone() for n, p in ref.named_parameters()}
    main = {n: p.detach().float().clone().requires_grad_() for n, p in ref.named_parameters()}
    decay = [main[n] for n, p in ref.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [main[n] for n, p in ref.named_parameters() if p.dim() <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIM["learning_rate"], weight_decay=OPTIM["weight_decay"], eps=OPTIM["adam_epsilon"],
    )  # fmt: skip
    nll = []
    for data in steps:
        n = data["mask"][:, 1:].sum()
        for m in main.values():
            m.grad = torch.zeros_like(m)
        total = 0.0
        for i in range(0, len(data["tokens"]), micro_batch_size):
            mb = {k: v[i : i + micro_batch_size] for k, v in data.items()}
            ref.zero_grad(set_to_none=True)
            loss, stats = _nll(ref(mb["tokens"], mb["position_ids"], None), mb, n, None, cfg.vocab_size)
            loss.backward()
            for name, p in ref.named_parameters():
                main[name].grad += p.grad.float()
            total += stats["nll"].item()
        torch.nn.utils.clip_grad_norm_(list(main.values()), clip)
        opt.step()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.copy_(main[name])
        nll.append(total)
    return init, {n: m.detach().clone() for n, m in main.items()}, {n: p.detach().clone() for n, p in ref.named_parameters()}, nll


def bf16_training_case(tp, pp, micro_batch_size, distributed_optimizer=False, grad_reduce_in_fp32=True):
    """Two SFT (token NLL) steps on a global batch of 8 at layout (tp, pp) against the
    naive mixed-precision oracle and its float32 twin."""
    cfg = tiny_config("llama", params_dtype="bfloat16")
    steps = [batch(b=8, seed=s) for s in range(STEPS)]
    init, ref_main, ref_params, ref_nll = _oracle(cfg, steps, OPTIM["max_grad_norm"], micro_batch_size)
    _, f32_main, _, f32_nll = _oracle(dataclasses.replace(cfg, params_dtype="float32"), steps, OPTIM["max_grad_norm"], micro_batch_size)

    g = groups(tp, pp)
    reseed(99, g)
    model = build_model(cfg, g, "lm")
    weights.load_full_state(model, init, g)
    optim = OptimConfig(**OPTIM, use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=grad_reduce_in_fp32)
    engine = TrainEngine(model, g, optim, max_steps=10)
    engine.scheduler.lr_decay_style = "constant"  # the oracle's AdamW uses a constant lr
    nll = []
    for data in steps:
        n = data["mask"][:, 1:].sum()
        local = {k: v.chunk(g.layout.dp)[g.dp_rank] for k, v in data.items()}
        mbs = [{k: v[i : i + micro_batch_size] for k, v in local.items()} for i in range(0, len(local["tokens"]), micro_batch_size)]
        stats = engine.train_step(mbs, lambda out, mb: _nll(out, mb, n, g.tp, cfg.vocab_size))
        nll.append(stats["nll"])
    params = weights.gather_full_state(engine.module, g)
    main = weights.gather_full_state(engine.module, g, values=main_weights(engine))
    return {
        **_diffs(main, params, {"main": ref_main}, f32_main),
        "param_diff": max((params[n].float() - ref_params[n].float()).abs().max().item() for n in params),
        "update": max((ref_main[n] - init[n]).abs().max().item() for n in init),
        "dtypes": dtypes_of(engine),
        "nll": nll, "ref_nll": ref_nll, "f32_nll": f32_nll,
    }  # fmt: skip


BF16_DTYPES = {"params": ["torch.bfloat16"], "main_grad": ["torch.float32"], "main": ["torch.float32"], "adam": ["torch.float32"]}


def check_exact_forward(res):
    """DP / PP / distributed optimizer: float32 main weights within MAIN_ATOL."""
    assert res["update"] > 1e-3  # the oracle moved: equality is not 0 == 0
    assert res["dtypes"] == BF16_DTYPES, res["dtypes"]
    assert res["params_are_rounded_main"], res
    assert res["main_diff"] < MAIN_ATOL, res
    torch.testing.assert_close(torch.tensor(res["nll"]), torch.tensor(res["ref_nll"]), rtol=1e-6, atol=0)


def check_bf16_arithmetic(res, label=""):
    """TP, PPO, DPO: no further from single-rank bf16 than bf16 is from float32."""
    assert res["params_are_rounded_main"], (label, res)
    assert res["main_norm_ratio"] < 1.0, (label, res)


@pytest.mark.parametrize(
    "tp,pp,kw",
    [(1, 1, {}), (1, 2, {}), (1, 1, {"distributed_optimizer": True})],
    ids=["dp2", "pp2", "dp2_distributed_optimizer"],
)
def test_sft_steps_bf16_exact_forward_layouts(world2, tp, pp, kw):
    for res in world2.run(bf16_training_case, tp, pp, 2, **kw):
        check_exact_forward(res)
    print(f"bf16 tp{tp} pp{pp} {kw}: main weights {res['main_diff']:.1e} from single-rank (tolerance {MAIN_ATOL:.0e})")


def test_sft_steps_bf16_tensor_parallel(world2, world4):
    """TP2 (2 ranks) and TP2 x DP2 with the distributed optimizer (4 ranks)."""
    for world, kw in ((world2, {}), (world4, {"distributed_optimizer": True})):
        for res in world.run(bf16_training_case, 2, 1, 2, **kw):
            assert res["update"] > 1e-3 and res["dtypes"] == BF16_DTYPES, res
            check_bf16_arithmetic(res)
            torch.testing.assert_close(torch.tensor(res["nll"]), torch.tensor(res["ref_nll"]), rtol=BF16_EPS, atol=0)
        print(f"bf16 tp2 {kw}: |main - single|_2 / |single bf16 - float32|_2 = {res['main_norm_ratio']:.2f}")


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["plain", "distributed_optimizer"])
def test_bf16_gradient_reduction_fails_the_check(world2, distributed_optimizer):
    """The broken variant: gradients accumulated and all-reduced in bf16."""
    res = world2.run(bf16_training_case, 1, 1, 2, distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=False)[0]
    assert res["dtypes"]["main_grad"] == ["torch.bfloat16"]
    with pytest.raises(AssertionError):
        check_exact_forward(res)
    assert res["main_diff"] > 100 * MAIN_ATOL, res
    print(f"bf16 gradient reduction: main weights {res['main_diff']:.1e} from single-rank (tolerance {MAIN_ATOL:.0e})")


def _diffs(got_main, got_params, ref, f32_main) -> dict:
    """Layout vs single-rank bf16 (`ref`: its main weights and bf16 params) and the
    single-rank bf16 vs float32 gap, for one model's full states."""
    return {
        "main_diff": max((got_main[n] - ref["main"][n]).abs().max().item() for n in f32_main),
        "main_norm_ratio": l2(got_main, ref["main"]) / l2(ref["main"], f32_main),
        "bf16_vs_f32": max((ref["main"][n] - f32_main[n]).abs().max().item() for n in f32_main),
        "params_are_rounded_main": all(torch.equal(got_params[n], got_main[n].to(got_params[n].dtype)) for n in got_main),
    }


def dtypes_of(engine: TrainEngine) -> dict[str, list[str]]:
    """Which dtype each kind of tensor has: parameters, gradient buffers, main weights, Adam moments."""
    opts = getattr(engine.optimizer, "chained_optimizers", None) or [engine.optimizer]
    inner = [o.optimizer for o in opts]
    return {
        "params": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "main_grad": sorted({str(p.main_grad.dtype) for p in engine.module.parameters()}),
        "main": sorted({str(p.dtype) for o in inner for g in o.param_groups for p in g["params"]}),
        "adam": sorted({str(v.dtype) for o in inner for st in o.state.values() for k, v in st.items() if k.startswith("exp_avg")}),
    }


BF16 = ["model.params_dtype=bfloat16"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The PPO test's assets (float32 checkpoints: they also initialise the bf16 runs) and
    the single-rank PPO update and DPO step, bf16 and float32, in one 1-rank world."""
    from tests.parallel.harness import World
    from tests.parallel.test_ppo_equivalence import make_assets

    root = tmp_path_factory.mktemp("bf16_assets")
    world = World(1)
    try:
        world.run(make_assets, str(root))
        refs = {
            (kind, dtype): world.run(fn, str(root), str(root / f"{kind}_{dtype}"), BF16 if dtype == "bf16" else [])[0]
            for kind, fn in (("ppo", ppo_bf16_case), ("dpo", dpo_bf16_case))
            for dtype in ("bf16", "f32")
        }
    finally:
        world.close()
    return root, refs


def ppo_bf16_case(root: str, run_dir: str, overrides: list[str]):
    """One PPO update (test_ppo_equivalence's) returning the actor's and critic's bf16
    parameters and float32 main weights (rank 0)."""
    from megarlhf.config import PPOConfig, load_config
    from megarlhf.trainers.ppo import PPOTrainer
    from tests.parallel.test_ppo_equivalence import MODEL, ROLLOUTS, fixed_rollouts

    cfg = load_config(
        PPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prompts_train.jsonl",
            "data.max_length=24", "generation.response_length=12", "generation.old_logprobs=recompute",
            f"sft_model_path={root}/sft", f"reward_model_path={root}/rm",
            "reward_fn=megarlhf.data.synthetic:sort_reward_batch",
            f"train.run_dir={run_dir}", f"train.global_batch_size={ROLLOUTS}", "train.micro_batch_size=2",
            "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=2", "ppo.kl_coef=0.1",
            "optim.learning_rate=1e-3", "optim.adam_epsilon=1e-4", "optim.lr_scheduler_type=constant",
            "critic_optim.learning_rate=1e-3", "critic_optim.adam_epsilon=1e-4",
            "critic_optim.lr_scheduler_type=constant",
        ] + overrides,
    )  # fmt: skip
    trainer = PPOTrainer(cfg)
    batch, items = fixed_rollouts(trainer, ROLLOUTS)
    before = weights.gather_full_state(trainer.actor.module, trainer.ctx["actor"])
    metrics = trainer.update(batch, items)
    out = {
        "metrics": metrics, "before": before, "dtypes": dtypes_of(trainer.actor), "critic_dtypes": dtypes_of(trainer.critic),
        "frozen_dtypes": sorted({str(p.dtype) for m in trainer.frozen_models() for p in m.parameters()}),
    }  # fmt: skip
    for role in ("actor", "critic"):
        engine, g = getattr(trainer, role), trainer.ctx[role]
        out[role] = {
            "params": weights.gather_full_state(engine.module, g),
            "main": weights.gather_full_state(engine.module, g, values=main_weights(engine)),
        }
    trainer.run.close()
    return out if dist.get_rank() == 0 else None


def dpo_bf16_case(root: str, run_dir: str, overrides: list[str]):
    """One DPO step (the policy's reference scoring each microbatch at the same layout)
    from the random SFT policy, on the synthetic preference pairs (rank 0's result)."""
    from functools import partial

    from megarlhf.config import DPOConfig, load_config
    from megarlhf.trainers.dpo import DPOTrainer
    from tests.parallel.test_ppo_equivalence import MODEL

    cfg = load_config(
        DPOConfig, None,
        MODEL + [
            f"data.tokenizer={root}/data/sp.model", f"data.train_file={root}/data/prefs_train.jsonl",
            "data.max_length=32", f"init_from={root}/sft", f"train.run_dir={run_dir}",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=1",
            "optim.learning_rate=1e-3", "optim.adam_epsilon=1e-4", "optim.lr_scheduler_type=constant",
            "beta=0.1", "rpo_alpha=1.0",
        ] + overrides,
    )  # fmt: skip
    trainer = DPOTrainer(cfg)
    microbatches = trainer.next_microbatches()
    n, _, _ = trainer.global_counts(microbatches)
    sums = trainer.engine.train_step(microbatches, partial(trainer.loss, n=n))
    out = {
        "loss": sums["loss"] / n.item(),
        "params": weights.gather_full_state(trainer.engine.module, trainer.groups),
        "main": weights.gather_full_state(trainer.engine.module, trainer.groups, values=main_weights(trainer.engine)),
        "dtypes": dtypes_of(trainer.engine),
    }
    trainer.run.close()
    return out if dist.get_rank() == 0 else None


def l2(a, b):
    return sum(((a[n].double() - b[n].double()) ** 2).sum() for n in b).sqrt().item()


PPO_LAYOUTS = {
    "dp2_distributed_optimizer": ["optim.use_distributed_optimizer=true", "critic_optim.use_distributed_optimizer=true"],
    "actor_tp2_reward_tp1_reference_pp2": ["layout.tp=2", "reward_layout.tp=1", "reference_layout.tp=1", "reference_layout.pp=2"],
    "actor_pp2_reward_tp2_engine_tp2": ["layout.pp=2", "reward_layout.tp=2", "reward_layout.pp=1", "generation.tp=2"],
}


@pytest.mark.parametrize("layout", sorted(PPO_LAYOUTS))
def test_ppo_update_bf16(world2, references, tmp_path, layout):
    """Actor, critic, reference and reward model in bf16 (from float32 checkpoints)."""
    root, refs = references
    ref, f32 = refs["ppo", "bf16"], refs["ppo", "f32"]
    moved = max((ref["actor"]["main"][k] - ref["before"][k].float()).abs().max().item() for k in ref["before"])
    assert moved > 1e-3, moved
    res = world2.run(ppo_bf16_case, str(root), str(tmp_path / "run"), BF16 + PPO_LAYOUTS[layout])[0]
    assert res["dtypes"] == res["critic_dtypes"] == BF16_DTYPES and res["frozen_dtypes"] == ["torch.bfloat16"]
    for role in ("actor", "critic"):
        diffs = _diffs(res[role]["main"], res[role]["params"], ref[role], f32[role]["main"])
        check_bf16_arithmetic(diffs, role)
        print(f"bf16 PPO {layout} {role}: L2 ratio {diffs['main_norm_ratio']:.2f}")
    # (Losses are not compared: vf_loss is a small difference of noisy bf16 values and
    # returns, measured 0.9% apart at TP2; the weights after the update are the check.)


@pytest.mark.parametrize(
    "layout",
    [["optim.use_distributed_optimizer=true"], ["layout.tp=2"], ["layout.pp=2"]],
    ids=["dp2_distributed_optimizer", "tp2", "pp2"],
)
def test_dpo_step_bf16(world2, references, tmp_path, layout):
    root, refs = references
    ref, f32 = refs["dpo", "bf16"], refs["dpo", "f32"]
    res = world2.run(dpo_bf16_case, str(root), str(tmp_path / "run"), BF16 + layout)[0]
    assert res["dtypes"] == BF16_DTYPES
    diffs = _diffs(res["main"], res["params"], ref, f32["main"])
    check_bf16_arithmetic(diffs)
    assert res["loss"] == pytest.approx(ref["loss"], rel=BF16_EPS)
    print(f"bf16 DPO {layout}: L2 ratio {diffs['main_norm_ratio']:.2f}")


def test_engine_samples_in_bf16(world2, references, tmp_path):
    """The rollout engine on a bf16 actor at TP2 (bf16 weights, activations and KV cache,
    which takes the keys' dtype): its sampling log-probs are the trainer's up to bf16
    rounding (float32: within 1e-5, test_ppo_equivalence). Bound 2^-4: sixteen bf16
    roundings of a unit logit; measured 4.6e-2 at most on the trained synthetic-task
    policy (tools/logprob_gap.py), far less on this random one."""
    from tests.parallel.test_ppo_equivalence import ROLLOUTS, sampling_logprobs_case

    root, _ = references
    res = world2.run(sampling_logprobs_case, str(root), str(tmp_path / "run"), BF16 + ["layout.tp=2"])[0]
    assert res["tokens"] > 3 * ROLLOUTS and res["mean_lp"] < -0.05, res
    assert 0 < res["lp"] < 2.0**-4 and res["ent"] < 2.0**-4, res
    print(f"bf16 engine vs trainer: max |log-prob diff| {res['lp']:.1e}, entropy {res['ent']:.1e}")


def bf16_checkpoint_case(run_dir: str):
    """A bf16 TP2 run's checkpoint (after one step, so the float32 main weights hold more
    than their bf16 rounding): its weights load exactly into bf16 at PP2 and into float32
    at TP1 (the bf16 values, cast), and resuming at TP2 restores the float32 main weights
    bitwise (not re-derived from the bf16 weights)."""
    from megarlhf.checkpoint.dist_ckpt import load_checkpoint, load_model_weights, save_checkpoint

    cfg = tiny_config("llama", params_dtype="bfloat16")
    src = groups(2, 1)
    reseed(5, src)
    engine = TrainEngine(build_model(cfg, src), src, OptimConfig(learning_rate=1e-2), max_steps=2)
    data = batch(b=4, seed=1)
    n = data["mask"][:, 1:].sum()
    engine.train_step([data], lambda out, mb: _nll(out, mb, n, src.tp, cfg.vocab_size))
    params = weights.gather_full_state(engine.module, src)
    main = weights.gather_full_state(engine.module, src, values=main_weights(engine))
    save_checkpoint(run_dir, 1, {"actor": engine}, {}, keep=1)

    out = {"main_has_more_bits": max((main[k] - params[k].float()).abs().max().item() for k in main)}
    for name, layout, dtype in (("bf16_pp2", (1, 2), "bfloat16"), ("f32_tp1", (1, 1), "float32")):
        dst = groups(*layout)
        model = build_model(dataclasses.replace(cfg, params_dtype=dtype), dst)
        load_model_weights(model, dst, run_dir, "actor")
        loaded = weights.gather_full_state(model, dst)
        out[name] = {
            "dtype": str(next(model.parameters()).dtype),
            "diff": max((loaded[k].float() - params[k].float()).abs().max().item() for k in params),
        }
    reseed(6, src)
    resumed = TrainEngine(build_model(cfg, src), src, OptimConfig(learning_rate=1e-2), max_steps=2)
    load_checkpoint(run_dir, {"actor": resumed})
    got = weights.gather_full_state(resumed.module, src, values=main_weights(resumed))
    out["resumed_main_diff"] = max((got[k] - main[k]).abs().max().item() for k in main)
    return out


def test_bf16_checkpoint_reshards_and_resumes(world2, tmp_path):
    for res in world2.run(bf16_checkpoint_case, str(tmp_path / "run")):
        assert res["main_has_more_bits"] > 0, res
        assert res["bf16_pp2"] == {"dtype": "torch.bfloat16", "diff": 0.0}, res
        assert res["f32_tp1"] == {"dtype": "torch.float32", "diff": 0.0}, res
        assert res["resumed_main_diff"] == 0.0, res
