"""The KV-cache generation engine against full recomputation, the trainer's log-probs,
and itself (reproducibility, stopping), at TP1 and TP2."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import weights
from megarlhf.rollout.engine import GenerationEngine
from megarlhf.rollout.sampling import SamplingParams
from tests.parallel.common import groups, reseed, tiny_config

VOCAB, EOS, PAD = 250, 1, 0
PROMPTS = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14], [40, 41, 42, 43, 44], [7, 100, 200, 3, 4, 5, 6, 90, 91]]


def _model(tp, arch="llama", **overrides):
    cfg = tiny_config(arch, **overrides)
    ref = groups(1, 1)
    reseed(7, ref)
    full = {n: p.detach().clone() for n, p in build_model(cfg, ref).named_parameters()}
    g = groups(tp, 1)
    reseed(7, g)
    model = build_model(cfg, g)
    weights.load_full_state(model, full, g)
    model.eval()
    return model, g


def _full_logits(model, g, tokens):
    """Unsharded logits [B, T, V] of a plain forward (no KV cache)."""
    out = model(tokens, torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens), None)
    if g.layout.tp > 1:
        shards = [torch.empty_like(out) for _ in range(g.layout.tp)]
        torch.distributed.all_gather(shards, out.contiguous(), group=g.tp)
        out = torch.cat(shards, -1)
    return out[..., :VOCAB]


def greedy_case(tp, arch, mode, max_new=12, model=None, engine=None):
    model, g = model or _model(tp, arch)
    engine = engine or GenerationEngine(
        model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD,
        cuda_graphs=mode == "fixed_shape", compile=mode == "compiled",
    )  # fmt: skip
    assert engine.left_pad  # one prefill behind left padding by default
    engine.left_pad = mode != "forced_prompt_steps"  # else prefill to the shortest prompt, then forced steps
    if mode == "compiled":
        from torch._dynamo.utils import counters

        counters.clear()
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, temperature=0), seeds=[0] * 4)
    # Oracle: each prompt alone, full recomputation of the whole prefix at every step.
    ref_tokens, ref_logprobs = [], []
    with torch.no_grad():
        for p in PROMPTS:
            seq, lps = list(p), []
            for _ in range(max_new):
                tokens = torch.tensor([seq], device=next(model.parameters()).device)
                logp = torch.log_softmax(_full_logits(model, g, tokens)[0, -1].float(), -1)
                tok = int(logp.argmax())
                seq.append(tok)
                lps.append(float(logp[tok]))
                if tok == EOS:
                    break
            ref_tokens.append(seq[len(p):])
            ref_logprobs.append(lps)
    if mode == "compiled":  # prefill and decode step really went through the compiler, a graph each
        assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    got_lp = [out.logprobs[i, len(p) : len(p) + int(out.response_lengths[i])].tolist() for i, p in enumerate(PROMPTS)]
    return {"tokens": [out.response_ids(i) for i in range(4)], "ref_tokens": ref_tokens,
            "logprobs": got_lp, "ref_logprobs": ref_logprobs}  # fmt: skip


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt"])
@pytest.mark.parametrize("mode", ["left_padded", "forced_prompt_steps", "fixed_shape", "compiled"])
def test_greedy_kv_cache_equals_full_recompute(world2, tp, arch, mode):
    """Prompts of 3, 7, 5 and 9 tokens in one batch; RoPE (llama) and learned absolute
    positions (gpt). fixed_shape: the decode step CUDA graphs replay (cache column from a
    device tensor, attention over the whole cache), run eagerly on CPU; compiled: the prefill
    and that step through torch.compile."""
    for res in world2.run(greedy_case, tp, arch, mode):
        assert res["tokens"] == res["ref_tokens"]
        for got, ref in zip(res["logprobs"], res["ref_logprobs"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)


class TypeOnlyMaskAttention(DotProductAttention):
    """Megatron's unfused core attention made to honour the mask *type* only, as Transformer
    Engine's does: the mask it is given is dropped (causal type: its own causal mask)."""

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        return super().forward(query, key, value, None, *args, **kwargs)


def type_only_mask_case(tp, arch):
    """A model whose core attention ignores masks generates through SDPA twins: checked
    against full recomputation by the model's own attention, in fixed-shape decode steps;
    the originals are back afterwards."""
    model, g = _model(tp, arch, attention_backend="unfused")
    for attn in [m for m in model.modules() if hasattr(m, "core_attention")]:
        attn.core_attention = TypeOnlyMaskAttention(
            config=attn.config, layer_number=attn.layer_number, attn_mask_type=attn.attn_mask_type,
            attention_type=attn.attention_type, pg_collection=attn.pg_collection,
        )  # fmt: skip
    originals = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, cuda_graphs=True)
    res = greedy_case(tp, arch, "fixed_shape", model=(model, g), engine=engine)
    res["restored"] = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")] == originals
    return res


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_attention_without_masks_generates_through_sdpa_twins(world2, tp, arch):
    for res in world2.run(type_only_mask_case, tp, arch):
        assert res["restored"]
        assert res["tokens"] == res["ref_tokens"]
        for got, ref in zip(res["logprobs"], res["ref_logprobs"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)


def sampled_case(tp, temperature=0.8):
    model, g = _model(tp)
    engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=50, top_p=0.9)
    out = engine.generate(PROMPTS, params, seeds=[11, 12, 13, 14])
    # The trainer's recomputation of the same sequences: one forward, no cache.
    with torch.no_grad():
        logits = model(out.tokens, torch.arange(out.tokens.shape[1]).expand_as(out.tokens), None)
        trainer_lp, trainer_ent = logprobs_and_entropy(
            logits[:, :-1], out.tokens[:, 1:], tp_group=g.tp, vocab_size=VOCAB, temperature=temperature
        )
    mask = out.response_mask[:, 1:].bool()
    # Same seeds, different batch (reversed order, one prompt dropped): same responses.
    again = engine.generate(PROMPTS[:0:-1], params, seeds=[14, 13, 12])
    return {
        "max_diff": (trainer_lp[mask] - out.logprobs[:, 1:][mask]).abs().max().item(),
        "entropy_diff": (trainer_ent[mask] - out.entropies[:, 1:][mask]).abs().max().item(),
        "responses": [out.response_ids(i) for i in range(4)],
        "again": [again.response_ids(i) for i in range(3)][::-1],
        "mask_tokens": int(mask.sum()),
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_logprobs_equal_trainer_logprobs_and_are_reproducible(world2, tp):
    for res in world2.run(sampled_case, tp):
        assert res["mask_tokens"] > 10
        assert res["max_diff"] < 1e-5, res["max_diff"]
        assert res["entropy_diff"] < 1e-5, res["entropy_diff"]
        assert res["again"] == res["responses"][1:]


def stop_case():
    model, g = _model(1)
    engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0), seeds=[0] * 4)
    third = free.response_ids(0)[2]  # make sample 0's third greedy token a stop token
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(third,)), [0] * 4)
    return free, stopped, third


def test_stop_tokens_and_length_limit(world2):
    free, stopped, third = world2.run(stop_case)[0]
    assert free.finish_reasons == ["length"] * 4 and free.response_lengths.tolist() == [8] * 4
    assert stopped.finish_reasons[0] == "stop"
    ids = stopped.response_ids(0)
    assert ids == free.response_ids(0)[: ids.index(third) + 1] and ids[-1] == third
    # Nothing after a stop is part of the response.
    p = len(PROMPTS[0])
    assert stopped.response_mask[0, p + len(ids) :].sum() == 0
    assert (stopped.tokens[0, p + len(ids) :] == PAD).all()


def _count_sevens(prompts, responses, answers):
    return [float(r.split().count("7")) for r in responses]


def best_of_n_case():
    from megarlhf.rollout.best_of_n import best_of_n

    model, g = _model(1)
    engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD)
    decode = lambda ids: " ".join(str(t % 10) for t in ids)  # noqa: E731  (a stand-in detokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    res = best_of_n(engine, PROMPTS, 8, params, _count_sevens, decode, ["p"] * 4, seed=3)
    rescored = _count_sevens(None, [decode(r) for r in res.best], None)
    return res, rescored


def test_best_of_n_keeps_the_best_sample(world2):
    res, rescored = world2.run(best_of_n_case)[0]
    assert res.scores.shape == (4, 8)
    assert res.best_scores == res.scores.max(dim=1).values.tolist() == rescored
    assert sum(res.best_scores) / 4 > res.scores.mean().item()
