"""`megarlhf generate` against transformers' own `generate`.

A tiny random Llama (2 layers, hidden 64, the sorting task's sentencepiece vocabulary) is
saved with save_pretrained and converted with tools/convert_hf_to_megatron.py. Greedy
responses to prompts of different lengths (one batch: left padding in the engine) must be
token-for-token transformers' greedy `generate` of each prompt alone, from the converted
checkpoint at TP1 and from the HF folder itself at TP2 on 2 ranks. The TP1 run also scores
with a rule and must print and write the summary with its interval; the TP2 run scores with
a converted random reward model (LlamaForSequenceClassification), whose scores must be
transformers' on the same prompt + response ids.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.e2e.conftest import REPO, megarlhf

transformers = pytest.importorskip("transformers")

MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny_llama(task_data, tmp_path_factory):
    """(HF folder, converted checkpoint, tokenizer, HF reward model folder, converted reward model)."""
    from megarlhf.data import load_tokenizer

    tok = load_tokenizer(task_data["tokenizer"])
    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen the random model so greedy argmaxes are far from ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(root / "hf")
    reward_model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**config.to_dict(), num_labels=1))
    reward_model.save_pretrained(root / "rm")
    for src, dst in (("hf", "converted"), ("rm", "rm_converted")):
        out = subprocess.run(
            [sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), str(root / src), str(root / dst)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return root / "hf", root / "converted", tok, root / "rm", root / "rm_converted"


def transformers_greedy(hf_dir, tok, prompts: list[str]) -> list[list[int]]:
    """Each prompt alone (no padding), greedy, stopping at EOS: the oracle."""
    from megarlhf.data import ChatTemplate

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([ChatTemplate().render_prompt(tok, p)])
        with torch.no_grad():
            full = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)  # fmt: skip
        new = full[0, ids.shape[1] :].tolist()
        out.append(new[: new.index(tok.eos_id) + 1] if tok.eos_id in new else new)
    return out


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_greedy_generate_matches_transformers(tiny_llama, task_data, tmp_path):
    from megarlhf.data import ChatTemplate

    hf_dir, converted, tok, rm_dir, rm_converted = tiny_llama
    rows = [json.loads(line) for line in open(task_data["prompts_test"])][:3]
    rows[1]["prompt"] = rows[1]["prompt"] + " " + rows[1]["prompt"]  # a longer prompt in the same batch
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = transformers_greedy(hf_dir, tok, [r["prompt"] for r in rows])
    assert len({tuple(e) for e in expected}) == len(expected)  # distinct answers: a row mix-up would show
    common = [f"data.tokenizer={task_data['tokenizer']}", f"max_new_tokens={MAX_NEW}"]

    # TP1 from the converted checkpoint, with a rule score and its summary.
    out1 = tmp_path / "tp1.jsonl"
    run = megarlhf("generate", "--model", converted, "--prompts", prompts, "--output", out1,
                   "--reward", "gsm8k_flexible", *common)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    got = read_jsonl(out1)
    assert [r["response_ids"] for r in got] == expected
    assert [r["response"] for r in got] == [tok.decode([t for t in e if t != tok.eos_id]) for e in expected]
    for r, e in zip(got, expected):
        assert r["response_tokens"] == len(e)
        assert r["finish_reason"] == ("stop" if e[-1] == tok.eos_id else "length")
        assert r["score"] in (0.0, 1.0)
    summary = json.loads(open(f"{out1}.summary.json").read())["samples"]
    assert summary["mean"] == pytest.approx(sum(r["score"] for r in got) / len(got))
    assert summary["ci_method"] == "wilson" and summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    assert "accuracy" in run.stdout and "95% CI" in run.stdout

    # TP2 on 2 ranks, straight from the Hugging Face folder, scored by the reward model.
    out2 = tmp_path / "tp2.jsonl"
    run = megarlhf("generate", "--model", hf_dir, "--prompts", prompts, "--output", out2, "--tp", "2",
                   f"reward_model_path={rm_converted}", *common, nproc=2)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    got = read_jsonl(out2)
    assert [r["response_ids"] for r in got] == expected
    rm = transformers.LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    for r, row in zip(got, rows):
        ids = torch.tensor([ChatTemplate().render_prompt(tok, row["prompt"]) + r["response_ids"]])
        with torch.no_grad():
            assert r["rm_score"] == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-4)
        assert r["score"] == r["rm_score"]
    assert "mean score" in run.stdout and "bootstrap" in run.stdout
