"""Bring your own model: a Hugging Face Llama with a ChatML tokenizer (built and converted by
the `converted_llama` fixture) through SFT, RM, DPO and GRPO, with only the converted
directory (or the previous stage's run) as the model; the tokenizer, special tokens, chat
template and model shape all come from it. Training files are Parquet, eval files
`save_to_disk` folders (conftest.DATA_WRITERS).

Task: yes/no questions whose SFT answers are "Yes." or "No." at random, so the SFT policy
says either; the preference data and GRPO's rule reward prefer "Yes".
"""

from __future__ import annotations

import random

import pytest

from tests.e2e.conftest import DATA_WRITERS, megarlhf
from tests.e2e.test_sft_rm import metrics

QUESTIONS = ["Is 3 more than 1?", "Is two plus two four?", "Can you help me?", "Is 9 a number?", "Good?",
             "Tell me a joke?", "Is the road long?", "Are you a helpful assistant?"]  # fmt: skip


def yes_reward(prompts: list[str], responses: list[str], answers: list | None = None) -> list[float]:
    """The GRPO rule: 1 for an answer that starts with 'Yes', else 0."""
    return [float(r.strip().startswith("Yes")) for r in responses]


def _rows(seed: int):
    rng = random.Random(seed)
    sft, pairs, prompts = [], [], []
    for k in range(64):
        q = QUESTIONS[k % len(QUESTIONS)]
        answer = rng.choice(["Yes.", "No."])
        if k % 4 == 3:  # multi-turn: every assistant turn is trained
            sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer},
                                     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Good bye"}]})
        else:
            sft.append({"prompt": q, "response": answer})
        pairs.append({"prompt": q, "chosen": "Yes.", "rejected": "No."})
        prompts.append({"prompt": q})
    return sft, pairs, prompts


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """Training files in Parquet (the SFT file mixes message lists and prompt/response rows,
    so each form's columns hold nulls in the other's rows), eval files as save_to_disk
    folders: every stage reads both formats once, at no extra runs."""
    root = tmp_path_factory.mktemp("hf_data")
    sft, pairs, prompts = _rows(0)
    files = {"sft": (sft, "parquet"), "pairs": (pairs, "parquet"), "pairs_eval": (pairs[:16], "save_to_disk"),
             "prompts": (prompts, "parquet"), "prompts_eval": (prompts[:32], "save_to_disk")}  # fmt: skip
    out = {}
    for name, (rows, fmt) in files.items():
        suffix, write = DATA_WRITERS[fmt]
        out[name] = str(write(root / f"{name}{suffix}", rows))
    return out


COMMON = ["optim.lr_scheduler_type=constant", "train.logging_steps=1000", "data.max_length=64"]


@pytest.fixture(scope="module")
def hf_sft(converted_llama, hf_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf_sft") / "run"
    out = megarlhf(
        "sft", f"init_from={converted_llama}", f"data.train_file={hf_data['sft']}", f"train.run_dir={run_dir}",
        "train.max_steps=20", "train.micro_batch_size=16", "train.global_batch_size=16", "optim.learning_rate=3e-3",
        "train.eval_steps=0", *COMMON,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


def test_sft_with_the_models_template_learns(hf_sft):
    config = (hf_sft / "config.yaml").read_text()
    assert "hf_model" not in config and "converted/hf" in config  # the tokenizer came from init_from
    losses = [r["loss"] for r in metrics(hf_sft)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses


def test_rm_from_the_sft_run(hf_sft, hf_data, tmp_path):
    run_dir = tmp_path / "rm"
    out = megarlhf(
        "rm", f"init_from={hf_sft}", f"data.train_file={hf_data['pairs']}", f"data.eval_file={hf_data['pairs_eval']}",
        f"train.run_dir={run_dir}", "train.max_steps=6", "train.micro_batch_size=16", "train.global_batch_size=16",
        "optim.learning_rate=1e-3", "train.eval_steps=0", *COMMON,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert metrics(run_dir)[-1]["eval_accuracy"] == 1.0


def test_dpo_from_the_sft_run(hf_sft, hf_data, tmp_path):
    run_dir = tmp_path / "dpo"
    out = megarlhf(
        "dpo", f"init_from={hf_sft}", f"data.train_file={hf_data['pairs']}", f"data.eval_file={hf_data['pairs_eval']}",
        f"train.run_dir={run_dir}", "train.max_steps=5", "train.micro_batch_size=16", "train.global_batch_size=16",
        "optim.learning_rate=1e-3", "train.eval_steps=0", *COMMON,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    last = metrics(run_dir)[-1]
    assert last["eval_rewards/accuracies"] == 1.0 and last["eval_rewards/margins"] > 0, last


def test_grpo_from_the_sft_run_raises_the_rule_reward(hf_sft, hf_data, tmp_path):
    run_dir = tmp_path / "grpo"
    out = megarlhf(
        "grpo", f"sft_model_path={hf_sft}", f"data.train_file={hf_data['prompts']}",
        f"data.eval_file={hf_data['prompts_eval']}", f"train.run_dir={run_dir}", "reward_fn=tests.e2e.test_hf_model:yes_reward",
        "train.max_steps=10", "train.eval_steps=10", "train.global_batch_size=8", "train.micro_batch_size=32",
        "grpo.num_generations=4", "grpo.num_mini_batches=1", "generation.response_length=6", "optim.learning_rate=3e-3",
        "optim.lr_scheduler_type=constant", "train.logging_steps=1000", "data.max_length=48",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = metrics(run_dir)
    before = next(r for r in rows if r["step"] == 0)["eval/rule_score"]
    after = rows[-1]["eval/rule_score"]
    assert after > before + 0.2, (before, after)
