"""Backbone construction on one rank: parameter count, heads, SDPA attention masks."""

import math

import pytest
import torch

from megarlhf.config import ModelConfig
from megarlhf.models.backbone import build_model, transformer_config
from megarlhf.parallel import weights


@pytest.mark.parametrize("arch", ["llama", "gpt"])
@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_config(single_rank, arch, head, tie):
    cfg = ModelConfig(arch=arch, num_query_groups=2 if arch == "llama" else None, tie_embeddings=tie)
    model = build_model(cfg, single_rank, head)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(head)


def test_value_head_gives_one_value_per_token(single_rank):
    model = build_model(ModelConfig(), single_rank, "value")
    out = model(torch.randint(0, 256, (3, 7)), torch.arange(7).expand(3, 7), None)
    assert out.shape == (3, 7, 1)


def naive_attention(q, k, v, scale):
    """q [sq, b, n, d], k/v [sk, b, ng, d]; causal with queries at the *last* sq positions."""
    sq, b, n, d = q.shape
    sk, ng = k.shape[0], k.shape[2]
    out = torch.zeros(sq, b, n, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            kv = h // (n // ng)
            for i in range(sq):
                pos = sk - sq + i
                scores = [scale * float(q[i, bi, h] @ k[j, bi, kv]) for j in range(pos + 1)]
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                out[i, bi, h] = sum(w[j] / z * v[j, bi, kv].double() for j in range(pos + 1))
    return out.reshape(sq, b, n * d)


@pytest.mark.parametrize("sq,sk", [(6, 6), (1, 6), (3, 7)])  # full, decode step, chunked prefill
def test_sdpa_core_attention_is_causal_and_gqa_aware(single_rank, sq, sk):
    from megatron.core.transformer.enums import AttnMaskType

    from megarlhf.models.attention import SDPAttention

    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2)
    attn = SDPAttention(
        transformer_config(cfg, single_rank), layer_number=1, attn_mask_type=AttnMaskType.causal,
        attention_type="self", pg_collection=single_rank.pgc,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, 4, 16, generator=g)
    k, v = torch.randn(sk, 2, 2, 16, generator=g), torch.randn(sk, 2, 2, 16, generator=g)
    out = attn(q, k, v, attention_mask=None)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, attn.softmax_scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_shard_unshard_round_trip(stride):
    full = torch.arange(48.0).reshape(12, 4)
    shards = [weights.shard_tensor(full, 0, stride, 3, r) for r in range(3)]
    assert torch.equal(weights.unshard_tensor(shards, 0, stride), full)
    if stride == 2:
        # SwiGLU fc1 = [gate; up]: rank r holds [gate_r; up_r].
        gate, up = full[:6], full[6:]
        assert torch.equal(shards[1], torch.cat([gate[2:4], up[2:4]]))


def test_global_layer_names():
    assert weights.global_name("decoder.layers.1.mlp.linear_fc1.weight", 4) == "decoder.layers.5.mlp.linear_fc1.weight"
    assert weights.global_name("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"
