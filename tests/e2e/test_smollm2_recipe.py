"""examples/smollm2/recipe.py end to end at toy size: the same script, configs and CLI stages as
the SmolLM2-135M recipe (SFT, then GRPO and DPO from the SFT run, DPO on pairs sampled by
`megarlhf generate --n` and ranked by a rule, greedy held-out evaluation of every model), on a
tiny random Llama with a real ChatML tokenizer (tests/hf_fixtures.py) and
the recipe's own arithmetic task, on 2 ranks. A random model answers no problem, so the pairs are
ranked by a rule that tells its samples apart (response parity); the table's scorer stays gsm8k.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, megarlhf


def parity_reward(prompts: list[str], responses: list[str], answers: list | None = None) -> list[float]:
    """1 for a response of even character length: a rule that ranks a random model's samples."""
    return [float(len(r) % 2 == 0) for r in responses]


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """The tiny random ChatML Llama with 512 positions (the task's prompts are ~150 of its
    small BPE's tokens), converted by tools/convert_hf_to_megatron.py."""
    from tests.hf_fixtures import tiny_llama

    root = tmp_path_factory.mktemp("smol_llama")
    src = tiny_llama(root / "hf_model", "chatml", max_positions=512, sharpen=8.0)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", str(src), str(root / "converted")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return root / "converted"


def test_recipe_runs_every_stage_and_scores_them(long_llama, tmp_path):
    from examples.smollm2.prepare import write_data

    counts = write_data(tmp_path / "data", 16, 4, seed=0)
    assert counts == {"train": 16, "test": 4}
    cmd = [sys.executable, "examples/smollm2/recipe.py", "--model", str(long_llama), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "runs"), "--nproc", "2", "--eval-prompts", "4", "--eval-tokens", "8",
           "--micro-batch", "1", "--prompt-length", "256", "--sft-steps", "2", "--sft-length", "384", "--sft-batch", "2",
           "--grpo-steps", "2", "--grpo-prompts", "2", "--generations", "2", "--response-length", "8", "--seeds", "0",
           "--pair-prompts", "4", "--pair-n", "4", "--pair-reward", f"{__name__}:parity_reward",
           "--dpo-steps", "1", "--dpo-batch", "2", "--set", "grpo:generation.temperature=0.9",
           "--set", "grpo:grpo.num_mini_batches=1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "runs" / "recipe" / "recipe.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["instruct", "sft", "sft_grpo_s0", "sft_dpo"]
    for name, r in rows.items():  # every model scored on the same 4 held-out prompts, one greedy sample each
        assert r["prompts"] == 4 and 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0, (name, r)
        samples = [json.loads(x) for x in (tmp_path / "runs" / "recipe" / f"eval_{name}.jsonl").read_text().splitlines()]
        assert len(samples) == 4 and all(s["score"] in (0.0, 1.0) for s in samples), name
        assert sum(s["score"] for s in samples) / 4 == r["accuracy"], name
    for name, steps in (("sft", 2), ("sft_grpo_s0", 2), ("sft_dpo", 1)):
        assert rows[name]["iterations"] == steps and rows[name]["seconds_per_iteration"] > 0, rows[name]
        assert (tmp_path / "runs" / name / "checkpoints" / "latest").is_file(), name
    assert len(rows["sft_grpo_s0"]["reward_curve"]) == 2
    assert rows["sft_dpo"]["pairs"] >= 1
    assert "| instruct |" in done.stdout and "total wall time" in done.stdout
    # --set reached the GRPO command line (the run's saved config shows it)
    assert "temperature: 0.9" in (tmp_path / "runs" / "sft_grpo_s0" / "config.yaml").read_text()
    # --resume keeps every finished row and trains nothing again
    again = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("(--resume), kept") == 4 and "failed" not in again.stdout
    assert json.loads((tmp_path / "runs" / "recipe" / "recipe.json").read_text())["rows"] == report["rows"]


def test_generate_answers_the_chat_prompt_as_transformers_does(long_llama, tmp_path):
    """docs/smollm2.md's check, on the tiny ChatML Llama: `megarlhf generate` on the converted
    checkpoint, greedy, renders the chat prompt with the model's own template and answers with
    transformers' greedy `generate` on the Hugging Face folder (apply_chat_template, the
    folder's generation_config EOS ids): the same token ids and text."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from examples.smollm2.prepare import QUESTION

    hf, new_tokens = long_llama.parent / "hf_model", 24
    messages = [{"role": "user", "content": QUESTION}]
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": messages}) + "\n")
    done = megarlhf("generate", "--model", str(long_llama), "--prompts", str(tmp_path / "q.jsonl"),
                    "--output", str(tmp_path / "out.jsonl"), "temperature=0", f"max_new_tokens={new_tokens}")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.loads((tmp_path / "out.jsonl").read_text())

    tok = AutoTokenizer.from_pretrained(hf)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    eos = GenerationConfig.from_pretrained(hf).eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens)
    answer = out[0, len(prompt) :].tolist()
    answer = answer[: next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))]
    assert row["prompt_tokens"] == len(prompt)
    assert row["response_ids"] == answer
    assert row["response"] == tok.decode(answer, skip_special_tokens=True)
    assert row["finish_reason"] == ("stop" if answer[-1] in eos else "length")
