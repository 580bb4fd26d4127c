"""Hugging Face <-> megarlhf: config mapping, tensor layout mapping, streaming safetensors.

Layer: checkpoint/. Pure functions over configs and tensors (`model_config_from_hf`,
`hf_config`, `weight_plan`, `fuse_qkv` / `split_qkv`, `to_megatron` / `to_hf`), and one
streaming reader (`stream_full_state`, `load_hf_weights`) used by
tools/convert_hf_to_megatron.py and by the trainers' `init_from: hf:/path`.
Megatron names are "full state" names: those of a TP1/PP1 GPTModel (parallel/weights.py).

What the mapping encodes:
- Megatron's fused `linear_qkv` holds, for each query group g in turn, [the q heads of g;
  k_g; v_g] as rows; HF keeps q_proj / k_proj / v_proj apart. Both use RoPE's rotate-half
  convention (HF's Llama conversion already permuted Meta's interleaved rows), so rows
  inside a head need no permutation. Groups are contiguous, so TP shards whole groups.
- SwiGLU's `linear_fc1` is [gate; up]; HF has gate_proj and up_proj.
- Megatron's vocabulary is padded to a multiple of make_vocab_size_divisible_by: the
  padded rows are zeros on import and dropped on export (vocab_size stays the true V).
- RoPE: plain (rope_theta), or Llama 3.1/3.2's 'llama3' scaling, of which Megatron-Core
  takes only the factor (the other three parameters must be Llama's); the rest is refused.
- A reward model is HF's *ForSequenceClassification with num_labels = 1: `score.weight`
  [1, h] <-> our value head's `output_layer.weight`. Neither has a bias.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from megarlhf.config import ConfigError, ModelConfig

Head = Literal["lm", "value"]


class ConversionError(ConfigError):
    """An HF model we cannot map (architecture, option, missing tensor or shape).
    The message names the config key or tensor; the tools and the CLI exit with code 2."""


@dataclass(frozen=True)
class Family:
    """An HF model family with the Llama block (RMSNorm, SwiGLU, RoPE, GQA)."""

    causal_lm: str
    """Architecture name of the policy (LM head)."""
    reward: str
    """Architecture name of the reward model (score head, num_labels = 1)."""
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2); no family here has an o_proj bias."""
    defaults: dict = field(default_factory=dict)
    """transformers' class defaults for config keys a config.json may omit."""


_COMMON = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "head_dim": None, "num_key_value_heads": None,
           "sliding_window": None, "use_sliding_window": False}  # fmt: skip
FAMILIES = {
    "llama": Family("LlamaForCausalLM", "LlamaForSequenceClassification", False, {**_COMMON}),
    "mistral": Family("MistralForCausalLM", "MistralForSequenceClassification", False,
                      {**_COMMON, "num_key_value_heads": 8, "sliding_window": 4096}),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", True,
                    {**_COMMON, "num_key_value_heads": 32}),
}  # fmt: skip
ARCHITECTURES = {
    arch: (name, head)
    for name, fam in FAMILIES.items()
    for arch, head in ((fam.causal_lm, "lm"), (fam.reward, "value"))
}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HFModel:
    """What an HF config.json describes, in megarlhf terms."""

    family: str
    head: Head
    config: ModelConfig
    notes: list[str]
    """Things a user should know (e.g. sliding window capped max_seq_length)."""


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConversionError(f"{file} does not exist: expected a Hugging Face model folder")
    return json.loads(file.read_text())


def model_config_from_hf(
    hf: dict, *, make_vocab_size_divisible_by: int = 128, params_dtype: str | None = None
) -> HFModel:
    """config.json (as a dict) -> family, head and the megarlhf ModelConfig; or ConversionError."""
    archs = hf.get("architectures") or [f"{hf.get('model_type', '?').capitalize()}ForCausalLM"]
    if archs[0] not in ARCHITECTURES or hf.get("model_type") != ARCHITECTURES[archs[0]][0]:
        raise ConversionError(
            f"config.json: architecture {archs[0]} (model_type {hf.get('model_type')!r}) is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    family, head = ARCHITECTURES[archs[0]]
    fam = FAMILIES[family]

    def get(key):
        if key in hf:
            return hf[key]
        if key in fam.defaults:
            return fam.defaults[key]
        raise ConversionError(f"config.json has no {key!r}")

    heads, hidden = get("num_attention_heads"), get("hidden_size")
    kv = get("num_key_value_heads") or heads
    theta, scaling, factor = _rope_from_hf(hf, get)
    checks = [
        (get("hidden_act") == "silu", f"hidden_act = {get('hidden_act')!r}: only 'silu' (SwiGLU) is supported"),
        (not get("mlp_bias"), "mlp_bias = true: MLP biases are not supported"),
        (fam.qkv_bias or not get("attention_bias"),
         "attention_bias = true: megarlhf has q/k/v biases but no o_proj bias"),
        (get("head_dim") in (None, hidden // heads),
         f"head_dim = {get('head_dim')}: megarlhf needs hidden_size / num_attention_heads = {hidden // heads}"),
        (theta.is_integer(), f"rope_theta = {theta}: Megatron takes an integer RoPE base"),
        ("quantization_config" not in hf, "quantization_config: quantized checkpoints are not supported"),
        (head == "lm" or len(hf.get("id2label") or {0: 0}) == 1 and hf.get("num_labels", 1) == 1,
         "num_labels != 1: a reward model has one score"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConversionError(f"config.json: {message} ({archs[0]})")

    notes = []
    max_len = get("max_position_embeddings")
    window = get("sliding_window") if family == "mistral" or get("use_sliding_window") else None
    if window and window < max_len:
        # Sliding-window attention equals full causal attention on sequences that fit the
        # window, which megarlhf's (full) attention then reproduces exactly.
        notes.append(f"sliding_window = {window}: max_seq_length capped to {window} (full attention up to it)")
        max_len = window
    dtype = params_dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ConversionError(f"config.json: dtype {dtype!r} is not one of {_DTYPES}")
    config = ModelConfig(
        arch="llama", num_layers=get("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=kv, ffn_hidden_size=get("intermediate_size"), vocab_size=get("vocab_size"),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, max_seq_length=max_len,
        rope_theta=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        norm_eps=get("rms_norm_eps"), tie_embeddings=get("tie_word_embeddings"),
        add_qkv_bias=fam.qkv_bias, params_dtype=dtype,
    )  # fmt: skip
    return HFModel(family, head, config, notes)


# Megatron-Core 0.16.1's llama3 RoPE scaling (RotaryEmbedding._apply_scaling) takes only
# the factor from GPTModel; these three keep Llama 3.1's values.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_from_hf(hf: dict, get) -> tuple[float, str, float]:
    """config.json -> (rope_theta, rope_scaling, rope_scaling_factor), read the way
    transformers 5 does; ConversionError for RoPE variants Megatron cannot reproduce."""
    # transformers >= 5 writes rope_parameters (type, theta and scaling); older versions
    # rope_scaling (type and scaling) next to a top-level rope_theta. transformers 5 lets
    # rope_scaling win when a config has both.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", get("rope_theta")))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor = {partial}: megarlhf rotates whole heads (1.0)")
    if rope_type == "default":
        return theta, "none", ModelConfig.rope_scaling_factor
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json: {key}.rope_type = {rope_type!r}: Megatron-Core reproduces only 'default' RoPE and "
            "Llama 3.1's 'llama3' scaling, not linear / dynamic / yarn / longrope"
        )
    found = {name: rope.get(name) for name in ("factor", *LLAMA3_ROPE_FIXED)}
    # transformers' fallback: a top-level original_max_position_embeddings, else max_position_embeddings.
    if "original_max_position_embeddings" in hf or found["original_max_position_embeddings"] is None:
        found["original_max_position_embeddings"] = hf.get("original_max_position_embeddings",
                                                           hf.get("max_position_embeddings"))  # fmt: skip
    for name, value in found.items():
        if value is None:
            raise ConversionError(f"config.json: {key} has no {name!r}, which rope_type 'llama3' needs")
    for name, fixed in LLAMA3_ROPE_FIXED.items():
        if float(found[name]) != fixed:
            raise ConversionError(
                f"config.json: {key}.{name} = {found[name]}: Megatron-Core's llama3 RoPE scaling fixes "
                f"{', '.join(f'{k} = {v:g}' for k, v in LLAMA3_ROPE_FIXED.items())} (only the factor is free)"
            )
    if float(found["factor"]) < 1.0:
        raise ConversionError(f"config.json: {key}.factor = {found['factor']}: llama3 RoPE scaling needs >= 1")
    return theta, "llama3", float(found["factor"])


def hf_config(cfg: ModelConfig, family: str, head: Head, *, base: dict | None = None,
              pad_token_id: int | None = None, dtype: str | None = None) -> dict:  # fmt: skip
    """ModelConfig -> an HF config.json dict; `base` (the original HF config) keeps its
    other keys (token ids, generation settings, a longer max_position_embeddings)."""
    if cfg.arch != "llama":
        raise ConversionError(f"model.arch = {cfg.arch!r}: only 'llama' models export to Hugging Face")
    if family not in FAMILIES:
        raise ConversionError(f"HF family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    if cfg.add_qkv_bias != fam.qkv_bias:
        raise ConversionError(
            f"model.add_qkv_bias = {cfg.add_qkv_bias} does not fit the {family} family "
            f"(q/k/v bias {fam.qkv_bias}): use --family {'qwen2' if cfg.add_qkv_bias else 'llama'}"
        )
    stale = ("architectures", "rope_scaling", "torch_dtype", "id2label", "label2id", "num_labels")
    out = {k: v for k, v in (base or {}).items() if k not in stale}
    out.update(
        architectures=[fam.reward if head == "value" else fam.causal_lm], model_type=family,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
        head_dim=cfg.hidden_size // cfg.num_attention_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=max(out.get("max_position_embeddings", 0), cfg.max_seq_length),
        rms_norm_eps=cfg.norm_eps, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, dtype=dtype or cfg.params_dtype,
    )  # fmt: skip
    # transformers < 5 reads rope_theta and rope_scaling, >= 5 rope_parameters.
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
        out["rope_parameters"] = {**out["rope_scaling"], "rope_theta": cfg.rope_theta}
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":  # transformers' default is a 4096-token window; ours is full attention
        out.setdefault("sliding_window", None)
    if head == "value":
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


def model_overrides(cfg: ModelConfig) -> list[str]:
    """The `model.*=...` overrides that build `cfg` (printed by the converter)."""
    keep = ("arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "make_vocab_size_divisible_by", "max_seq_length", "rope_theta", "rope_scaling",
            "norm_eps", "tie_embeddings", "add_qkv_bias", "params_dtype")  # fmt: skip
    if cfg.rope_scaling != "none":
        keep += ("rope_scaling_factor",)
    return [f"model.{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.name in keep]


def mismatched_overrides(cfg: ModelConfig, hf_cfg: ModelConfig) -> list[str]:
    """Overrides that would make `cfg` take `hf_cfg`'s weights ([] when it already can)."""
    same = ("arch", "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "rope_theta", "rope_scaling",
            "norm_eps", "tie_embeddings", "add_qkv_bias")  # fmt: skip
    if hf_cfg.rope_scaling != "none":
        same += ("rope_scaling_factor",)
    out = [f"model.{k}={getattr(hf_cfg, k)}" for k in same if getattr(cfg, k) != getattr(hf_cfg, k)]
    if cfg.query_groups != hf_cfg.query_groups:
        out.append(f"model.num_query_groups={hf_cfg.query_groups}")
    if cfg.ffn_size != hf_cfg.ffn_size:
        out.append(f"model.ffn_hidden_size={hf_cfg.ffn_size}")
    if cfg.max_seq_length > hf_cfg.max_seq_length:
        out.append(f"model.max_seq_length={hf_cfg.max_seq_length}")
    return out


# --- tensors ------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """q [nq*d, ...], k and v [ng*d, ...] -> Megatron's linear_qkv [ng*(nq/ng+2)*d, ...]:
    for each group g, [q heads of g; k_g; v_g]. Works for weights [., h] and biases [.]."""
    d, rest = k.shape[0] // num_groups, q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * d, *rest)
    k, v = k.reshape(num_groups, d, *rest), v.reshape(num_groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [ng, (nq/ng+2)*d, ...] -> rows


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    per, rest = num_heads // num_groups, qkv.shape[1:]
    d = qkv.shape[0] // (num_groups * (per + 2))
    q, k, v = qkv.reshape(num_groups, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, h] -> [rows, h], the extra rows zero (Megatron's padded vocabulary)."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


@dataclass(frozen=True)
class Rule:
    """How one Megatron tensor is made of HF tensors."""

    kind: Literal["copy", "qkv", "gate_up", "vocab"]
    hf: tuple[str, ...]
    """HF tensor names, in the order `kind` combines them."""


def weight_plan(cfg: ModelConfig, head: Head) -> dict[str, Rule]:
    """{Megatron full-state name: Rule} for every parameter of `cfg`'s model with `head`.

    With tied embeddings `output_layer.weight` is listed too: only last pipeline stages
    (PP > 1) hold that copy of the embedding, a TP1/PP1 model has no such parameter."""
    plan = {
        "embedding.word_embeddings.weight": Rule("vocab", ("model.embed_tokens.weight",)),
        "decoder.final_layernorm.weight": Rule("copy", ("model.norm.weight",)),
    }
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        plan[m + "input_layernorm.weight"] = Rule("copy", (h + "input_layernorm.weight",))
        plan[m + "self_attention.linear_qkv.weight"] = Rule("qkv", tuple(f"{attn}{p}_proj.weight" for p in "qkv"))
        if cfg.add_qkv_bias:
            plan[m + "self_attention.linear_qkv.bias"] = Rule("qkv", tuple(f"{attn}{p}_proj.bias" for p in "qkv"))
        plan[m + "self_attention.linear_proj.weight"] = Rule("copy", (attn + "o_proj.weight",))
        plan[m + "pre_mlp_layernorm.weight"] = Rule("copy", (h + "post_attention_layernorm.weight",))
        plan[m + "mlp.linear_fc1.weight"] = Rule("gate_up", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"))
        plan[m + "mlp.linear_fc2.weight"] = Rule("copy", (h + "mlp.down_proj.weight",))
    if head == "value":
        plan["output_layer.weight"] = Rule("copy", ("score.weight",))
    else:
        lm_head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        plan["output_layer.weight"] = Rule("vocab", (lm_head,))
    return plan


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape HF gives tensor `name` for `cfg`."""
    h, f, d = cfg.hidden_size, cfg.ffn_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
              "score.weight": (1, h), "norm.weight": (h,),
              "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
              "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
              "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f)}  # fmt: skip
    return next(shape for suffix, shape in shapes.items() if name.endswith(suffix))


_TO_MEGATRON = {
    "copy": lambda ts, cfg: ts[0],
    "qkv": lambda ts, cfg: fuse_qkv(*ts, cfg.num_attention_heads, cfg.query_groups),
    "gate_up": lambda ts, cfg: torch.cat(ts),
    "vocab": lambda ts, cfg: pad_rows(ts[0], cfg.padded_vocab_size),
}
_TO_HF = {
    "copy": lambda t, cfg: [t],
    "qkv": lambda t, cfg: list(split_qkv(t, cfg.num_attention_heads, cfg.query_groups)),
    "gate_up": lambda t, cfg: list(t.chunk(2)),
    "vocab": lambda t, cfg: [t[: cfg.vocab_size]],
}


def to_megatron(rule: Rule, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return _TO_MEGATRON[rule.kind](tensors, cfg)


def to_hf(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One Megatron full tensor -> its HF tensors (views where possible)."""
    return dict(zip(rule.hf, _TO_HF[rule.kind](tensor, cfg), strict=True))


# --- files --------------------------------------------------------------------------------
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # recomputed buffers some old checkpoints store
_WEIGHT_FILES = re.compile(r"\.(safetensors|bin|pt|pth|msgpack|h5|ckpt)$|\.index\.json$")


def copy_hf_metadata(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy an HF folder's files other than weights (config, tokenizer, generation config)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for file in sorted(Path(src).iterdir()):
        if file.is_file() and not _WEIGHT_FILES.search(file.name) and file.name not in skip:
            shutil.copy2(file, dst / file.name)
            copied.append(file.name)
    return copied


def safetensors_index(path: str | Path) -> dict[str, Path]:
    """{tensor name: file} of an HF folder (model.safetensors.index.json or *.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(
            f"{path}: no *.safetensors files (pytorch_model.bin is not read: re-save the model with "
            "save_pretrained(..., safe_serialization=True))"
        )
    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def stream_full_state(path: str | Path, cfg: ModelConfig, head: Head, wanted: Iterable[str],
                      strict: bool = False) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield (Megatron full-state name, tensor) for each name in `wanted`, reading the HF
    safetensors shard by shard, tensor by tensor: a Megatron tensor is built as soon as
    its HF inputs have been read, which are then dropped. `head` is the HF model's head.
    `strict`: every tensor in the folder must be one the mapping knows."""
    from safetensors import safe_open

    plan, where = weight_plan(cfg, head), safetensors_index(path)
    wanted = list(wanted)
    for name in wanted:
        if name not in plan:
            raise ConversionError(f"{name}: the {head} model in {path} has no tensor for this parameter")
    users: dict[str, list[str]] = {}  # HF name -> Megatron names still waiting for it
    for name in wanted:
        for src in plan[name].hf:
            if src not in where:
                raise ConversionError(f"{path}: no tensor {src!r} (needed for {name})")
            users.setdefault(src, []).append(name)
    if strict:
        known = {s for rule in plan.values() for s in rule.hf} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
        extra = sorted(n for n in where if n not in known and not _IGNORED.search(n))
        if extra:
            raise ConversionError(f"{path}: tensors the mapping does not know (unsupported architecture?): {extra[:5]}")
    pending: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(where[s] for s in users):  # files in index order, each opened once
        with safe_open(file, "pt") as f:
            for src in [s for s in users if where[s] == file]:
                t = f.get_tensor(src)
                if tuple(t.shape) != hf_shape(src, cfg):
                    raise ConversionError(
                        f"{src} in {file.name}: shape {tuple(t.shape)}, but config.json implies {hf_shape(src, cfg)}"
                    )
                pending[src] = t
                for name in list(users[src]):  # (the loop removes names from this list)
                    rule = plan[name]
                    if all(s in pending for s in rule.hf):
                        yield name, to_megatron(rule, [pending[s] for s in rule.hf], cfg)
                        for s in rule.hf:
                            users[s].remove(name)
                            if not users[s]:
                                del pending[s]


@torch.no_grad()
def load_hf_weights(model, groups, path: str | Path, *, strict: bool = False, progress: bool = False) -> HFModel:
    """Copy an HF model's weights into this rank's shard/stage of `model` (any TP/PP).

    Every rank reads only the tensors of its own stage and keeps only its TP slice; no
    rank ever holds the full model. `model` must have been built from a ModelConfig that
    matches the HF config (else ConversionError with the overrides to use). A value-head
    model loaded from a causal LM keeps its freshly initialised head."""
    from megarlhf.output import progress_bar
    from megarlhf.parallel.weights import local_parameters, shard_tensor

    cfg, head = model.megarlhf_config, model.megarlhf_head
    src = model_config_from_hf(read_hf_config(path), params_dtype=cfg.params_dtype)
    fixes = mismatched_overrides(cfg, src.config)
    if fixes:
        raise ConversionError(f"model config does not match {path}/config.json: set {' '.join(fixes)}")
    if head == "lm" and src.head == "value":
        raise ConversionError(f"{path} is a reward model ({src.family}); a policy needs a *ForCausalLM model")
    local = local_parameters(model, groups)
    wanted = [n for n in local if head == src.head or not n.startswith("output_layer.")]
    tp, rank = groups.layout.tp, groups.tp_rank
    for name, full in progress_bar(stream_full_state(path, cfg, src.head, wanted, strict), total=len(wanted),
                                   desc="hf -> megatron", unit="tensor", disable=not progress):  # fmt: skip
        param = local[name][1]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            full = shard_tensor(full, param.partition_dim, getattr(param, "partition_stride", 1), tp, rank)
        if full.shape != param.shape:
            raise ConversionError(f"{name}: converted shape {tuple(full.shape)}, parameter {tuple(param.shape)}")
        param.copy_(full)
    return src
