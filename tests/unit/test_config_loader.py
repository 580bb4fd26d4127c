"""YAML + dotted overrides -> dataclasses, with errors that name the key."""

import pytest

from megarlhf.config import ConfigError, DPOConfig, PPOConfig, RMConfig, SFTConfig, describe, dump_yaml, load_config

REQUIRED = ["data.tokenizer=tok.model", "data.train_file=train.jsonl"]


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_layers: 4\n  arch: gpt\noptim:\n  learning_rate: 3.0e-4\ntrain:\n  max_steps: 7\n")
    cfg = load_config(SFTConfig, f, REQUIRED + ["optim.learning_rate=1e-5", "layout.tp=2", "model.tie_embeddings=true"])
    assert (cfg.model.num_layers, cfg.model.arch, cfg.train.max_steps) == (4, "gpt", 7)
    assert cfg.optim.learning_rate == 1e-5 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.layout.tp == 2 and cfg.model.tie_embeddings is True
    assert cfg.model.num_query_groups is None


def test_round_trip_through_dumped_yaml(tmp_path):
    cfg = load_config(RMConfig, None, REQUIRED + ["margin=0.5", "model.num_query_groups=2"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(RMConfig, f) == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.learning_rat=1", "unknown config key optim.learning_rat; did you mean optim.learning_rate"),
        ("model.num_layers=two", "model.num_layers = 'two': expected an integer"),
        ("model.arch=bert", "model.arch = 'bert': expected one of"),
        ("model.tie_embeddings=maybe", "expected true or false"),
        ("train.max_steps=0", "train.max_steps = 0: must be >= 1"),
        ("noequals", "expected key=value"),
        ("model.num_layers.x=1", "model.num_layers = {.x.: 1}: expected an integer"),
    ],
)
def test_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SFTConfig, None, REQUIRED + [override])


@pytest.mark.parametrize(
    "cls,overrides,match",
    [
        (SFTConfig, ["layout.pp=2"], "every model it compiles; layout.pp = 2: set layout.pp=1"),
        (SFTConfig, ["model.recompute=full"], "train.compile with model.recompute = 'full'"),
        (DPOConfig, ["init_from=sft", "precompute_ref_log_probs=true", "reference_layout.pp=2"],
         "reference_layout.pp = 2: set reference_layout.pp=1"),
        (PPOConfig, ["sft_model_path=sft", "reward_fn=m:f", "layout.pp=2", "reward_layout.pp=1", "reference_layout.pp=1",
                     "critic_layout.pp=1"], "layout.pp = 2"),
        (PPOConfig, ["sft_model_path=sft", "reward_fn=m:f", "critic_layout.pp=2"], "critic_layout.pp = 2"),
    ],
)
def test_compile_needs_pp1_for_every_compiled_model(cls, overrides, match):
    """train.compile compiles trained and frozen models alike: each layout is checked."""
    load_config(cls, None, REQUIRED + [o for o in overrides if ".pp=" not in o and "recompute" not in o] + ["train.compile=true"])
    with pytest.raises(ConfigError, match=match):
        load_config(cls, None, REQUIRED + overrides + ["train.compile=true"])


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="data.tokenizer and data.train_file are required"):
        load_config(SFTConfig, None, [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)


def test_every_field_has_help():
    rows = describe(RMConfig)
    missing = [key for key, _, doc in rows if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    assert ("margin", "0.0") == rows[-2][:2]


RL = REQUIRED + ["sft_model_path=sft", "reward_fn=m:f"]


@pytest.mark.parametrize(
    "stage,override,match",
    [
        ("ppo", "ppo.policy_loss=gspo", "ppo.policy_loss = 'gspo': expected one of \\['ppo', 'gspo_token'"),
        ("ppo", "ppo.policy_loss=dapo", "ppo.policy_loss"),
        ("grpo", "grpo.sapo_temperature_neg=0", "grpo.sapo_temperature_pos and grpo.sapo_temperature_neg must be > 0"),
        ("grpo", "grpo.overlong_buffer_length=40", "grpo.overlong_buffer_length = 40: must be in \\[0, generation.response_length = 32\\]"),
        ("ppo", "ppo.overlong_buffer_length=-1", "ppo.overlong_buffer_length = -1"),
        ("grpo", "rollout_correction.mask_low=1.2", "0 <= mask_low < 1 < mask_high"),
        ("grpo", "rollout_correction.mode=token_tis", "rollout_correction.mode"),
        ("ppo", "train.dump_rollouts=-1", "train.dump_rollouts = -1"),
    ],
)
def test_objective_and_correction_errors_name_the_key(stage, override, match):
    from megarlhf.config import GRPOConfig

    cls = {"ppo": PPOConfig, "grpo": GRPOConfig}[stage]
    with pytest.raises(ConfigError, match=match):
        load_config(cls, None, RL + [override])


def test_correction_needs_the_metrics():
    from megarlhf.config import GRPOConfig

    with pytest.raises(ConfigError, match="needs rollout_correction.measure = true"):
        load_config(GRPOConfig, None, RL + ["rollout_correction.mode=token_mask", "rollout_correction.measure=false"])
    cfg = load_config(GRPOConfig, None, RL + ["grpo.policy_loss=sapo", "grpo.epsilon_high=0.28"])
    assert cfg.grpo.objective_knobs == {"temperature_pos": 1.0, "temperature_neg": 1.05}
    cfg = load_config(PPOConfig, None, RL + ["ppo.policy_loss=cispo", "ppo.cliprange=0.3"])
    assert cfg.ppo.objective_knobs == {"cliprange_low": 0.3, "cliprange_high": 0.3}
