"""ModelConfig -> Megatron-Core TransformerConfig + GPTModel, with an LM or value head.

Layer: models/. The only module that imports `GPTModel` and the layer specs. Transformer
Engine's spec is used when TE imports (NGC containers); otherwise Megatron-Core's local
spec with SDPA core attention, and torch norms that support sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megarlhf.config import ConfigError, ModelConfig
from megarlhf.models.attention import KeyRopeCachedSelfAttention, SDPAttention
from megarlhf.models.heads import ValueHead
from megarlhf.parallel.layout import RoleGroups

try:  # Transformer Engine is optional: NGC images ship it, pip-only CPU machines do not.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Head = Literal["lm", "value"]


def transformer_config(cfg: ModelConfig, groups: RoleGroups) -> TransformerConfig:
    """The Megatron-Core TransformerConfig for `cfg` at the layout of `groups`."""
    layout = groups.layout
    layout.check_model(
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        hidden_size=cfg.hidden_size,
    )
    if cfg.padded_vocab_size % layout.tp:
        raise ConfigError(
            f"padded vocabulary {cfg.padded_vocab_size} is not divisible by tp = {layout.tp}: "
            f"raise model.make_vocab_size_divisible_by to a multiple of {layout.tp}"
        )
    dtype = _DTYPES[cfg.params_dtype]
    llama = cfg.arch == "llama"
    on_gpu = torch.cuda.is_available()
    recompute = {} if cfg.recompute == "none" else {"recompute_granularity": cfg.recompute}
    if cfg.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else F.gelu,
        add_bias_linear=not llama,
        add_qkv_bias=cfg.add_qkv_bias or not llama,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=cfg.sequence_parallel and layout.tp > 1,
        # Full-size weights drawn on CPU and then split: the same seed gives the same
        # model at every TP. On GPU Megatron initialises each shard in place (faster).
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels need CUDA (and TE/Apex); keep them off where they cannot run.
        bias_activation_fusion=on_gpu and HAVE_TE and not llama,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        **recompute,
    )


def _use_te(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "transformer_engine":
        if not HAVE_TE:
            raise ConfigError(
                "model.transformer_impl = 'transformer_engine' but transformer_engine does not "
                "import: install it (pip install megarlhf[gpu]) or use 'auto'/'local'"
            )
        return True
    return cfg.transformer_impl == "auto" and HAVE_TE and torch.cuda.is_available()


def decoder_spec(cfg: ModelConfig, config: TransformerConfig, pp_rank: int):
    """The decoder spec: TE fused layers, or the local spec with SDPA and torch norms."""
    if _use_te(cfg):
        spec = get_gpt_layer_with_transformer_engine_spec()
        spec.submodules.self_attention.module = KeyRopeCachedSelfAttention
        return spec
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if cfg.arch == "llama" else "LayerNorm")
    spec.submodules.self_attention.module = KeyRopeCachedSelfAttention
    attn = spec.submodules.self_attention.submodules
    if cfg.attention_backend == "sdpa":
        attn.core_attention = SDPAttention
    # Torch norms that, unlike WrappedTorchNorm, also run under sequence parallelism.
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    # A block spec (rather than a layer spec) so that the final norm is a TorchNorm too.
    num_layers = get_num_layers_to_build(config, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=TorchNorm)


class TorchNorm:
    """torch LayerNorm/RMSNorm built like Megatron's WrappedTorchNorm, sequence-parallel aware.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so
    the norm weights get different gradients per rank; tagging them `sequence_parallel`
    makes Megatron's `finalize_model_grads` all-reduce those gradients over TP.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def build_model(cfg: ModelConfig, groups: RoleGroups, head: Head = "lm") -> GPTModel:
    """Build this rank's stage/shard of the model for one role.

    head='lm': the policy (vocab-parallel logits). head='value': the critic / reward model
    (one scalar per token from a `ValueHead` replacing the LM head).
    """
    config = transformer_config(cfg, groups)
    spec = decoder_spec(cfg, config, groups.pp_rank)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_seq_length,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings and head == "lm",
        position_embedding_type="rope" if cfg.arch == "llama" else "learned_absolute",
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling == "llama3",
        rope_scaling_factor=cfg.rope_scaling_factor,
        pg_collection=groups.pgc,
    )
    if head == "value" and groups.is_last_stage:
        model.output_layer = ValueHead(config, groups.tp)
    model.megarlhf_head = head
    model.megarlhf_config = dataclasses.replace(cfg)
    return model
