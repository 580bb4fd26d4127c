"""Core attention on torch SDPA for Megatron-Core's local layer spec.

Layer: models/. Megatron-Core's local `DotProductAttention` materialises the [b, np, sq, sk]
score matrix (baddbmm + softmax + bmm). Transformer Engine replaces it on GPU; without TE
this module does the same job with `torch.nn.functional.scaled_dot_product_attention`,
which runs flash / memory-efficient kernels on GPU and a fused kernel on CPU. It is a
drop-in `core_attention` submodule: same constructor, same [sq, b, np, hn] contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """`DotProductAttention` whose forward is one SDPA call (causal, GQA-aware)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias need TE")
        sq, b, heads, hn = query.shape
        sk = key.shape[0]
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is not None:
            # Megatron's masks are True where attention is *blocked*; SDPA's where allowed.
            mask = ~attention_mask
        elif sq == sk:
            is_causal = True
        elif sq > 1:
            # Prefill continuing a KV cache: queries are the last sq positions (bottom-right
            # aligned causal mask; SDPA's is_causal would align top-left).
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        # sq == 1 (decode step): attends to every cached key, no mask needed.
        dropout_p = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition,
            )  # fmt: skip
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
