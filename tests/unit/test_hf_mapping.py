"""HF <-> megarlhf mapping (megarlhf/checkpoint/hf.py) against naive references: the fused
QKV layout per query group, SwiGLU fc1, vocabulary padding, config mapping both ways, and
the errors a user sees for unsupported models and wrong shapes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megarlhf.checkpoint import hf
from megarlhf.config import ConfigError, ModelConfig
from megarlhf.parallel.weights import shard_tensor

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 250,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "hidden_act": "silu", "dtype": "float32",
}  # fmt: skip

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip


def naive_fuse(q, k, v, nq, ng):
    """Megatron's layout spelled out: for each group, its q heads one by one, then k, then v."""
    d = k.shape[0] // ng
    rows = []
    for g in range(ng):
        for j in range(nq // ng):
            head = g * (nq // ng) + j
            rows.append(q[head * d : (head + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("nq,ng", [(8, 2), (8, 8), (8, 1), (6, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_qkv_matches_naive_loop_and_round_trips(nq, ng, bias):
    d, h = 4, 16
    rest = () if bias else (h,)
    q, k, v = torch.randn(nq * d, *rest), torch.randn(ng * d, *rest), torch.randn(ng * d, *rest)
    fused = hf.fuse_qkv(q, k, v, nq, ng)
    assert torch.equal(fused, naive_fuse(q, k, v, nq, ng))
    for a, b in zip(hf.split_qkv(fused, nq, ng), (q, k, v)):
        assert torch.equal(a, b)


def test_tp_shard_of_fused_qkv_holds_whole_query_groups():
    """Why Megatron can shard linear_qkv as one matrix: TP rank r gets groups of rank r."""
    nq, ng, d, h, tp = 8, 4, 4, 16, 2
    q, k, v = torch.randn(nq * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    fused = hf.fuse_qkv(q, k, v, nq, ng)
    for r in range(tp):
        per_q, per_kv = q.shape[0] // tp, k.shape[0] // tp
        sl = lambda t, n: t[r * n : (r + 1) * n]  # noqa: E731
        expected = hf.fuse_qkv(sl(q, per_q), sl(k, per_kv), sl(v, per_kv), nq // tp, ng // tp)
        assert torch.equal(shard_tensor(fused, 0, 1, tp, r), expected)


def random_hf_state(cfg: ModelConfig, head: str) -> dict[str, torch.Tensor]:
    plan = hf.weight_plan(cfg, head)
    names = {s for name, rule in plan.items() for s in rule.hf}
    return {n: torch.randn(hf.hf_shape(n, cfg)) for n in sorted(names)}


@pytest.mark.parametrize(
    "overrides,head",
    [({}, "lm"), ({"tie_embeddings": True, "add_qkv_bias": True}, "lm"), ({}, "value")],
    ids=["llama-gqa", "qwen2-tied", "reward"],
)
def test_tensors_round_trip_exactly(overrides, head):
    cfg = hf.model_config_from_hf(LLAMA).config
    cfg = ModelConfig(**{**cfg.__dict__, **overrides})
    state = random_hf_state(cfg, head)
    back = {}
    for name, rule in hf.weight_plan(cfg, head).items():
        if head == "lm" and cfg.tie_embeddings and name == "output_layer.weight":
            continue  # a TP1/PP1 model holds no separate output layer when tied
        full = hf.to_megatron(rule, [state[s] for s in rule.hf], cfg)
        if rule.kind == "vocab":  # padded with zero rows to a multiple of 128
            assert full.shape[0] == cfg.padded_vocab_size == 256 and not full[cfg.vocab_size :].any()
        back.update(hf.to_hf(rule, full, cfg))
    assert back.keys() == state.keys()
    for n in state:
        assert torch.equal(back[n], state[n]), n


def test_gate_up_is_fc1_layout():
    cfg = hf.model_config_from_hf(LLAMA).config
    rule = hf.weight_plan(cfg, "lm")["decoder.layers.1.mlp.linear_fc1.weight"]
    assert rule.hf == ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    assert torch.equal(hf.to_megatron(rule, [gate, up], cfg), torch.cat([gate, up]))


def test_config_mapping_both_ways():
    got = hf.model_config_from_hf(LLAMA)
    cfg = got.config
    assert (got.family, got.head) == ("llama", "lm")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups) == (2, 64, 8, 2)
    assert (cfg.ffn_size, cfg.vocab_size, cfg.padded_vocab_size, cfg.max_seq_length) == (96, 250, 256, 128)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.add_qkv_bias) == (500000.0, 1e-5, False, False)
    for family in ("llama", "mistral", "qwen2"):
        c = ModelConfig(**{**cfg.__dict__, "add_qkv_bias": family == "qwen2"})
        for head in ("lm", "value"):
            again = hf.model_config_from_hf(hf.hf_config(c, family, head))
            assert (again.family, again.head, again.config) == (family, head, c)
    qwen = hf.model_config_from_hf({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    assert qwen.config.add_qkv_bias
    # transformers < 5 keeps rope_theta at the top level
    legacy = {k: v for k, v in LLAMA.items() if k != "rope_parameters"} | {"rope_theta": 1e6}
    assert hf.model_config_from_hf(legacy).config.rope_theta == 1e6


def test_llama3_rope_scaling_maps_both_ways():
    # Llama 3.2's config.json as transformers < 5 wrote it: rope_scaling + top-level rope_theta.
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"} | {"factor": 32.0}
    legacy = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": scaling}
    cfg = hf.model_config_from_hf(legacy).config
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (500000.0, "llama3", 32.0)
    assert "model.rope_scaling=llama3" in hf.model_overrides(cfg)
    assert "model.rope_scaling_factor=32.0" in hf.model_overrides(cfg)
    # transformers >= 5: rope_parameters; original_max_position_embeddings defaults as there
    current = {**LLAMA, "max_position_embeddings": 8192,
               "rope_parameters": {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}}
    assert hf.model_config_from_hf(current).config.rope_scaling_factor == 8.0
    out = hf.hf_config(cfg, "llama", "lm")
    assert out["rope_parameters"] == {**LLAMA3_ROPE, "factor": 32.0}
    assert out["rope_scaling"] == scaling
    assert hf.model_config_from_hf(out).config == cfg
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": "none", "rope_scaling_factor": 8.0})
    assert "rope_scaling" not in hf.hf_config(plain, "llama", "lm", base=legacy)
    assert hf.mismatched_overrides(plain, cfg) == ["model.rope_scaling=llama3", "model.rope_scaling_factor=32.0"]


def test_rope_scaling_needs_rope():
    with pytest.raises(ConfigError, match="model.rope_scaling = 'llama3' needs RoPE"):
        ModelConfig(arch="gpt", rope_scaling="llama3")
    with pytest.raises(ConfigError, match="model.rope_scaling_factor = 0.5"):
        ModelConfig(rope_scaling="llama3", rope_scaling_factor=0.5)


def test_mistral_sliding_window_caps_sequence_length():
    got = hf.model_config_from_hf(
        {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 32}
    )
    assert got.config.max_seq_length == 32 and "sliding_window" in got.notes[0]
    none = hf.model_config_from_hf({**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                    "sliding_window": None})  # fmt: skip
    assert none.config.max_seq_length == 128 and not none.notes


@pytest.mark.parametrize(
    "change,words",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "Qwen3ForCausalLM"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}}, "'dynamic'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}}, "'yarn'"),
        ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0}}, r"rope_parameters\.low_freq_factor = 2\.0"),
        ({"rope_parameters": {**LLAMA3_ROPE, "high_freq_factor": 8.0}}, r"high_freq_factor = 8\.0"),
        ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
         "rope_scaling.original_max_position_embeddings = 4096"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "no 'low_freq_factor'"),
        ({"rope_parameters": {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}}, "no 'factor'"),
        ({"rope_parameters": {**LLAMA3_ROPE, "factor": 0.5}}, "factor = 0.5"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"head_dim": 32}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "o_proj"),
        ({"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}, "num_labels"),
    ],
)
def test_unsupported_configs_fail_with_the_reason(change, words):
    with pytest.raises(hf.ConversionError, match=words):
        hf.model_config_from_hf({**LLAMA, **change})


def write_folder(path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    cfg = hf.model_config_from_hf(LLAMA).config
    state = random_hf_state(cfg, "lm")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.randn(24, 64)
    write_folder(tmp_path / "m", LLAMA, state)
    wanted = list(hf.weight_plan(cfg, "lm"))
    with pytest.raises(hf.ConversionError, match=r"k_proj\.weight.*\(24, 64\).*\(16, 64\)"):
        list(hf.stream_full_state(tmp_path / "m", cfg, "lm", wanted))


def test_stream_reports_missing_and_unknown_tensors(tmp_path):
    cfg = hf.model_config_from_hf(LLAMA).config
    state = random_hf_state(cfg, "lm")
    wanted = list(hf.weight_plan(cfg, "lm"))
    write_folder(tmp_path / "extra", LLAMA, {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(hf.ConversionError, match="q_norm"):
        list(hf.stream_full_state(tmp_path / "extra", cfg, "lm", wanted, strict=True))
    del state["model.norm.weight"]
    write_folder(tmp_path / "missing", LLAMA, state)
    with pytest.raises(hf.ConversionError, match=r"model\.norm\.weight.*decoder\.final_layernorm"):
        list(hf.stream_full_state(tmp_path / "missing", cfg, "lm", wanted))


def test_stream_over_sharded_index_yields_each_tensor_once(tmp_path):
    """Tensors split over two files, with q in one and k/v in the other: every Megatron
    tensor is still built once, from the right inputs."""
    cfg = hf.model_config_from_hf(LLAMA).config
    state = random_hf_state(cfg, "lm")
    names = sorted(state)
    first = {n for n in names if "q_proj" in n or n.startswith("model.embed")}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA))
    for file, part in (("a.safetensors", first), ("b.safetensors", set(names) - first)):
        save_file({n: state[n] for n in part}, tmp_path / "m" / file)
    index = {"weight_map": {n: "a.safetensors" if n in first else "b.safetensors" for n in names}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = hf.weight_plan(cfg, "lm")
    out = dict(hf.stream_full_state(tmp_path / "m", cfg, "lm", list(plan), strict=True))
    assert out.keys() == plan.keys()
    for name, rule in plan.items():
        assert torch.equal(out[name], hf.to_megatron(rule, [state[s] for s in rule.hf], cfg)), name


def test_value_head_is_score_weight_only():
    """HF's score layer has no bias, and neither has megarlhf's value head."""
    cfg = hf.model_config_from_hf(LLAMA).config
    plan = hf.weight_plan(cfg, "value")
    assert [n for n in plan if n.startswith("output_layer.")] == ["output_layer.weight"]
    assert plan["output_layer.weight"] == hf.Rule("copy", ("score.weight",))


def test_mismatched_overrides_name_the_fields():
    cfg = hf.model_config_from_hf(LLAMA).config
    other = ModelConfig(**{**cfg.__dict__, "num_layers": 4, "num_query_groups": 8, "max_seq_length": 512})
    assert hf.mismatched_overrides(other, cfg) == [
        "model.num_layers=2", "model.num_query_groups=2", "model.max_seq_length=128",
    ]  # fmt: skip
    assert hf.mismatched_overrides(cfg, cfg) == []
