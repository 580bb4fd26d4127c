"""Attention pieces swapped into Megatron-Core's layer specs.

Layer: models/.

`KeyRopeCachedSelfAttention`: Megatron's static KV cache stores keys *before* RoPE and
re-rotates the whole cache at every decode step (O(T) rotary work per token per layer;
a third of a decode step at 21M parameters on CPU). This subclass rotates each key once,
when it enters the cache, and lets the forward rotate only the new queries, as Megatron's
dynamic-batching path does. Training forwards (no inference context) are untouched.

`FixedShapeDecodeContext`: a `StaticInferenceContext` whose decode steps all have one
shape, which is what a CUDA graph replays: the step's new key/value go to the cache column
held in a device tensor (`position`), and attention spans the whole cache under the
caller's mask (columns after `position` hidden). Megatron-Core's own static-batching graphs
need flash-decode (flash-attn); this works with any core attention that honours a mask
(megarlhf's SDPA attention). Used by the rollout engine under `generation.cuda_graphs`.

`sdpa_twins`: the rollout engine needs a core attention that applies an arbitrary mask
(left-padded prompts, fixed-shape decode steps). Transformer Engine's attention, and
Megatron's unfused one, take a mask *type*. Core attention holds no weights, so for
generation each layer's can be swapped for an `SDPAttention` built from the same
attention module's settings, and swapped back afterwards.

`SDPAttention`: Megatron-Core's local `DotProductAttention` materialises the [b, np, sq, sk]
score matrix (baddbmm + softmax + bmm). Transformer Engine replaces it on GPU; without TE
this module does the same job with `torch.nn.functional.scaled_dot_product_attention`,
which runs flash / memory-efficient kernels on GPU and a fused kernel on CPU. It is a
drop-in `core_attention` submodule: same constructor, same [sq, b, np, hn] contract.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class FixedShapeDecodeContext(StaticInferenceContext):
    """Static KV cache whose decode steps take their cache column from `position` (a
    1-element long tensor on the model's device) instead of the Python-side
    `sequence_len_offset`, and return the whole cache as keys/values. The caller masks the
    columns not written yet; the cache starts zeroed, so hidden columns hold no NaN."""

    def __init__(self, max_batch_size: int, max_sequence_length: int, device: torch.device):
        super().__init__(max_batch_size, max_sequence_length)
        self.position = torch.zeros(1, dtype=torch.long, device=device)


class KeyRopeCachedSelfAttention(SelfAttention):
    """`SelfAttention` whose static KV cache holds keys with RoPE already applied."""

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        # Megatron's [seq, batch, groups, dim] shape, stored batch- and head-major: the
        # attention reads it as [batch, groups, seq, dim], and with this layout each
        # (row, head) is one contiguous block (SDPA in CPU decode steps: ~1.5x faster at 21M).
        # Zeros, not Megatron's torch.empty: a fixed-shape decode step attends over the
        # whole cache, and a masked-out column must hold a finite value (0 x NaN = NaN).
        if self.config.flash_decode:  # Megatron's flash-decode kernels take its own layout
            return super()._allocate_memory(inference_max_sequence_length, batch_size, dim, dtype).zero_()
        memory = torch.zeros(
            batch_size, self.num_query_groups_per_partition, inference_max_sequence_length, dim,
            dtype=dtype, device=torch.cuda.current_device(),
        )  # fmt: skip
        return memory.permute(2, 0, 1, 3)

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if isinstance(inference_context, FixedShapeDecodeContext) and inference_context.is_decode_only():
            return self._fixed_shape_decode(inference_context, query, key, value, rotary_pos_emb)
        if (
            inference_context is None
            or rotary_pos_emb is None
            or not inference_context.is_static_batching()
            or self.config.flash_decode
        ):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config, cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs
        )
        # The forward then rotates the queries at their positions and leaves keys alone.
        return query, key, value, (q_pos_emb[start:end], None), mask_type, block_table

    def _fixed_shape_decode(self, ctx: FixedShapeDecodeContext, query, key, value, rotary_pos_emb):
        """One decode token per row, written to cache column `ctx.position`; keys/values
        returned: the whole cache (the caller's attention mask hides unwritten columns)."""
        if key.size(0) != 1:
            raise ValueError(f"a fixed-shape decode step takes one token per row, got {key.size(0)}")
        key_memory, value_memory = ctx.key_value_memory_dict[self.layer_number]
        query_rope = None
        if rotary_pos_emb is not None:  # rotary tables span the whole cache (max_sequence_length)
            q_pos_emb, k_pos_emb = rotary_pos_emb
            key = apply_rotary_pos_emb(
                key, k_pos_emb.index_select(0, ctx.position), config=self.config, cp_group=self.pg_collection.cp
            )
            query_rope = (q_pos_emb.index_select(0, ctx.position), None)
        # Written through the memory's storage order ([batch, groups, seq, dim], see
        # _allocate_memory): torch.compile then updates the column in place rather than
        # copying the whole cache.
        key_memory.permute(1, 2, 0, 3).index_copy_(2, ctx.position, key.permute(1, 2, 0, 3))
        value_memory.permute(1, 2, 0, 3).index_copy_(2, ctx.position, value.permute(1, 2, 0, 3))
        return query, key_memory, value_memory, query_rope, AttnMaskType.no_mask, None


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
        # The model-parallel RNG matters only to dropout; without it, no RNG state swaps
        # (they would also read the generator state inside a CUDA graph capture).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
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


def sdpa_twins(model: torch.nn.Module) -> list[tuple[torch.nn.Module, SDPAttention]] | None:
    """(self-attention module, SDPAttention twin of its core attention) for every layer
    whose core attention is not already an `SDPAttention`; [] when all are; None when some
    self-attention is not a `KeyRopeCachedSelfAttention` (megarlhf's layer spec), whose
    core attention cannot be swapped safely."""
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not all(isinstance(m, KeyRopeCachedSelfAttention) for m in attentions):
        return None
    twins = []
    for attn in attentions:
        core = attn.core_attention
        if isinstance(core, SDPAttention):
            continue
        if next(core.parameters(), None) is not None:
            return None  # a core attention with weights (e.g. a learned softmax offset)
        twin = SDPAttention(
            config=getattr(core, "config", attn.config), layer_number=attn.layer_number,
            attn_mask_type=attn.attn_mask_type, attention_type=attn.attention_type,
            softmax_scale=attn.config.softmax_scale, pg_collection=attn.pg_collection,
        )  # fmt: skip
        twins.append((attn, twin.eval()))
    return twins
