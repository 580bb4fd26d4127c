"""The engine's non-finite guard (engine/engine.py) at DP2 and PP2: a step whose loss is NaN
on one rank only is skipped by every rank, and leaves weights, Adam state and the LR
schedule exactly as they were.

Oracle: a second engine with the same initial weights that never saw the bad step; after
one more (finite) step both must be bit-identical, so the skipped step changed nothing
(not the moments, not Adam's step count, not the schedule).
"""

from __future__ import annotations

import math

import torch

from megarlhf.config import OptimConfig
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import weights
from tests.parallel.common import batch, groups, reseed, tiny_config


def _nll(output, mb, n, tp_group, vocab, poison=False):
    lp, _ = logprobs_and_entropy(output[:, :-1], mb["tokens"][:, 1:], tp_group=tp_group, vocab_size=vocab)
    mask = mb["mask"][:, 1:]
    nll = -(lp * mask).sum()
    if poison:
        nll = nll * float("nan")
    return nll / n, {"nll": nll.detach(), "tokens": mask.sum()}


def _engine(g, cfg, full):
    reseed(99, g)
    model = build_model(cfg, g, "lm")
    weights.load_full_state(model, full, g)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=2, adam_epsilon=1e-4, max_grad_norm=1.0)
    return TrainEngine(model, g, optim, max_steps=10)


def _step(engine, g, cfg, data, poison_rank=None):
    n = data["mask"][:, 1:].sum()
    local = {k: v.chunk(g.layout.dp)[g.dp_rank] for k, v in data.items()}
    mbs = [{k: v[i : i + 2] for k, v in local.items()} for i in range(0, len(local["tokens"]), 2)]
    for i, mb in enumerate(mbs):  # dataset indices, as the supervised trainers attach them
        mb["sample_index"] = torch.arange(2 * i, 2 * i + 2) + 100 * g.dp_rank
    poison = poison_rank is not None and torch.distributed.get_rank() == poison_rank
    return engine.train_step(mbs, lambda out, mb: _nll(out, mb, n, g.tp, cfg.vocab_size, poison=poison))


def skip_case(tp, pp):
    cfg = tiny_config("llama")
    g = groups(tp, pp)
    reseed(99, groups(1, 1))
    full = {k: v.detach().clone() for k, v in build_model(cfg, groups(1, 1), "lm").named_parameters()}
    guarded, oracle = _engine(g, cfg, full), _engine(g, cfg, full)
    first, bad, last = batch(b=8, seed=0), batch(b=8, seed=1), batch(b=8, seed=2)
    _step(guarded, g, cfg, first)
    _step(oracle, g, cfg, first)
    before = {k: v.clone() for k, v in weights.gather_full_state(guarded.module, g).items()}
    # NaN on the last rank only: the DP all-reduce / PP broadcast must carry it everywhere.
    skipped = _step(guarded, g, cfg, bad, poison_rank=torch.distributed.get_world_size() - 1)
    unchanged = weights.gather_full_state(guarded.module, g)
    a, b = _step(guarded, g, cfg, last), _step(oracle, g, cfg, last)
    after_g, after_o = weights.gather_full_state(guarded.module, g), weights.gather_full_state(oracle.module, g)
    return {
        "skipped_applied": skipped["update_applied"],
        "skipped_grad_norm": skipped["grad_norm"],
        "skip_lines": list(guarded.skips),
        "changed_by_skip": max((unchanged[k] - before[k]).abs().max().item() for k in before),
        "diff_vs_oracle": max((after_g[k] - after_o[k]).abs().max().item() for k in after_o),
        "moved": max((after_o[k] - before[k]).abs().max().item() for k in before),
        "lr": (a["learning_rate"], b["learning_rate"]),
        "consecutive": guarded.consecutive_skips,
    }


def _check(results):
    # The rank whose losses were NaN names its microbatches and their samples.
    assert "non-finite loss in microbatch(es) [0, 1" in results[-1]["skip_lines"][0], results[-1]  # all of them
    assert "samples [" in results[-1]["skip_lines"][0], results[-1]
    for res in results:
        assert res["skipped_applied"] == 0.0 and math.isnan(res["skipped_grad_norm"]), res
        assert len(res["skip_lines"]) == 1 and "grad norm nan" in res["skip_lines"][0], res
        assert res["changed_by_skip"] == 0.0, res
        assert res["moved"] > 1e-5, res  # the oracle's last step did move the weights ...
        assert res["diff_vs_oracle"] == 0.0, res  # ... and the guarded engine moved identically
        assert res["lr"][0] == res["lr"][1], res  # warm-up did not advance on the skipped step
        assert res["consecutive"] == 0, res


def test_nonfinite_step_is_skipped_on_every_rank_dp2(world2):
    _check(world2.run(skip_case, 1, 1))


def test_nonfinite_step_is_skipped_on_every_rank_pp2(world2):
    _check(world2.run(skip_case, 1, 2))


def prestep_resume_case(run_dir):
    """A checkpoint saved before any applied step (no Adam moments yet) resumes; the next
    step equals the uninterrupted engine's."""
    from megarlhf.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint

    cfg = tiny_config("llama")
    g = groups(1, 1)
    reseed(99, groups(1, 1))
    full = {k: v.detach().clone() for k, v in build_model(cfg, groups(1, 1), "lm").named_parameters()}
    straight, resumed = _engine(g, cfg, full), _engine(g, cfg, full)
    path = save_checkpoint(run_dir, 0, {"actor": straight}, {}, keep=1)
    resumed.module.embedding.word_embeddings.weight.data.zero_()  # so that the load must restore it
    load_checkpoint(path, {"actor": resumed})
    data = batch(b=8, seed=3)
    _step(straight, g, cfg, data)
    _step(resumed, g, cfg, data)
    a, b = weights.gather_full_state(straight.module, g), weights.gather_full_state(resumed.module, g)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_before_the_first_optimizer_step(world2, tmp_path):
    assert world2.run(prestep_resume_case, str(tmp_path / "run")) == [0.0, 0.0]
