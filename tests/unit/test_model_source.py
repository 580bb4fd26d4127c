"""init_from / sft_model_path bring the model's shape and tokenizer (checkpoint/source.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from megarlhf.checkpoint.source import apply_model_source
from megarlhf.config import ConfigError, DPOConfig, GRPOConfig, ModelConfig, SFTConfig, load_config
from megarlhf.config.loader import dump_yaml
from tests.hf_fixtures import hf_tokenizer

SHAPE = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=400,
                    max_seq_length=256, rope_theta=500000.0)  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """What tools/convert_hf_to_megatron.py leaves (weights aside): model_config.yaml + hf/."""
    out = tmp_path_factory.mktemp("converted")
    (out / "model_config.yaml").write_text(dump_yaml(SHAPE))
    (out / "checkpoints").mkdir()
    hf_tokenizer(out / "hf", "chatml")
    return out


def load(cls, *overrides):
    return load_config(cls, None, ["data.train_file=x.jsonl", *overrides], prepare=apply_model_source)


def test_converted_checkpoint_sets_model_and_tokenizer(converted):
    cfg = load(SFTConfig, f"init_from={converted}", "model.recompute=full", "data.max_length=64")
    assert (cfg.model.hidden_size, cfg.model.num_query_groups, cfg.model.rope_theta) == (64, 2, 500000.0)
    assert cfg.model.recompute == "full"  # not an architecture field: the user's choice stands
    assert cfg.data.tokenizer == str(converted / "hf")
    # Explicit values equal to the checkpoint's are fine; a different one names both values.
    assert load(SFTConfig, f"init_from={converted}/checkpoints", "model.hidden_size=64").model.hidden_size == 64
    with pytest.raises(ConfigError, match=r"model.hidden_size = 128 conflicts with init_from = .*says hidden_size = 64"):
        load(SFTConfig, f"init_from={converted}", "model.hidden_size=128")
    with pytest.raises(ConfigError, match=r"model.num_query_groups = 4 conflicts .* num_query_groups = 2"):
        load(DPOConfig, f"init_from={converted}", "model.num_query_groups=4")
    # A stage's run directory passes on its tokenizer and template choice (GRPO from SFT).
    run = converted.parent / "sft_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": vars(SHAPE), "data": {
        "tokenizer": str(converted / "hf"), "chat_template": "builtin", "eos_token": "<|endoftext|>"}}))
    cfg = load(GRPOConfig, f"sft_model_path={run}", "reward_fn=m:f", "data.max_length=64")
    assert (cfg.data.tokenizer, cfg.data.chat_template, cfg.data.eos_token) == (
        str(converted / "hf"), "builtin", "<|endoftext|>")
    assert load(GRPOConfig, f"sft_model_path={run}", "reward_fn=m:f", "data.max_length=64",
                "data.chat_template=").data.chat_template == "builtin"  # '' is 'not set': the run's stands


def test_hf_folder_sets_model_from_config_json(tmp_path):
    folder = hf_tokenizer(tmp_path / "hf_model", "llama3")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 400,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    for path in (str(folder), f"hf:{folder}"):
        cfg = load(SFTConfig, f"init_from={path}", "data.max_length=64")
        assert cfg.init_from == f"hf:{folder}"
        assert (cfg.model.num_layers, cfg.model.ffn_hidden_size, cfg.data.tokenizer) == (2, 128, str(folder))
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size = 256 conflicts .* ffn_hidden_size = 128"):
        load(SFTConfig, f"init_from={folder}", "model.ffn_hidden_size=256")
    # No model there: left to the trainer's checkpoint loader (exit code 3, "no checkpoint at ...").
    assert load(SFTConfig, f"init_from={tmp_path}", "data.tokenizer=t.json").model == SFTConfig.__dataclass_fields__[
        "model"].default_factory()
