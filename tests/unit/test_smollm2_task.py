"""The SmolLM2 example's math task: verl's schema, disjoint seeded splits, and worked
solutions whose arithmetic is right and whose '####' answer the GSM8K reward accepts."""

from __future__ import annotations

import re

from examples.smollm2.math_task import INSTRUCTION, make_splits
from megarlhf.rollout.math_rewards import format_reward, gsm8k_reward


def test_rows_follow_verl_schema_and_splits_are_disjoint():
    splits = make_splits(300, 50, seed=3)
    assert make_splits(300, 50, seed=3) == splits  # seeded
    assert make_splits(300, 50, seed=4) != splits
    train_q = {r["extra_info"]["question"] for r in splits["train"]}
    test_q = {r["extra_info"]["question"] for r in splits["test"]}
    assert len(train_q) == 300 and len(test_q) == 50 and not train_q & test_q
    for split, rows in splits.items():
        for i, r in enumerate(rows):
            assert set(r) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
            assert r["reward_model"]["style"] == "rule" and r["ability"] == "math"
            assert r["prompt"] == [{"role": "user", "content": r["extra_info"]["question"] + INSTRUCTION}]
            assert r["extra_info"]["split"] == split and r["extra_info"]["index"] == i


def test_worked_solutions_are_right():
    rows = make_splits(400, 0, seed=0)["train"]
    solutions = [r["extra_info"]["answer"] for r in rows]
    truths = [r["reward_model"] for r in rows]
    assert gsm8k_reward(None, solutions, truths) == [1.0] * len(rows)
    assert format_reward(None, solutions) == [1.0] * len(rows)
    checked = 0
    for s in solutions:  # every "a op b = c" step, recomputed
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", s):
            assert eval(f"{a} {op} {b}") == int(c), s  # noqa: S307 (digits and one operator)
            checked += 1
    assert checked >= len(rows)
    assert all(int(t["ground_truth"]) >= 0 for t in truths)


def test_recipe_configs_take_the_model_from_the_converted_dir():
    """The recipe's configs name no model shape and no tokenizer: init_from / sft_model_path
    bring both from the converted checkpoint (checkpoint/source.py); with the tokenizer that
    source fills in, each one passes megarlhf's validation."""
    from pathlib import Path

    import yaml

    from megarlhf.config import DPOConfig, GRPOConfig, SFTConfig, load_config

    here = Path(__file__).resolve().parents[2] / "examples" / "smollm2"
    for name, cls, key in (("sft.yaml", SFTConfig, "init_from"), ("grpo.yaml", GRPOConfig, "sft_model_path"),
                           ("dpo.yaml", DPOConfig, "init_from")):  # fmt: skip
        tree = yaml.safe_load((here / name).read_text())
        assert "model" not in tree and not (tree.get("data") or {}).get("tokenizer"), name
        assert tree[key] == "runs/smollm2/model", name
        cfg = load_config(cls, here / name, ["data.tokenizer=runs/smollm2/model/hf"])
        assert getattr(cfg, key) == "runs/smollm2/model", name
