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


def test_config_sketches_validate():
    """The recipe's configs pass megarlhf's validation (they run once the trainers read the
    model's own tokenizer specials and chat template)."""
    from pathlib import Path

    from megarlhf.config import GRPOConfig, SFTConfig, load_config

    here = Path(__file__).resolve().parents[2] / "examples" / "smollm2"
    assert load_config(GRPOConfig, here / "grpo.yaml").model.num_parameters() > 130e6
    assert load_config(SFTConfig, here / "sft.yaml").init_from == "runs/smollm2/model"
