"""`megarlhf generate`'s samples do not depend on the layout or the batch size: sampled
(n = 2, T = 1) from one checkpoint at TP2 (one replica, every row in one engine call) and
at DP2 (two replicas, 3 prompts split unevenly, one row per call) the output files are the
same, rows, ids, finish reasons and scores (greedy ids equal transformers': tests/e2e/test_generate.py)."""

from __future__ import annotations

import json

import torch.distributed as dist

from megarlhf.checkpoint.dist_ckpt import save_model_weights
from megarlhf.config import GenerateConfig, load_config
from megarlhf.models.backbone import build_model
from tests.parallel.common import groups, reseed, tiny_config


def save_tiny(path: str, vocab: int) -> None:
    g = groups(1, 1)
    reseed(3, g)
    model = build_model(tiny_config(vocab_size=vocab, max_seq_length=128), g, "lm")
    save_model_weights(model, g, path, "actor")


def generate_case(overrides: list[str]) -> list[dict] | None:
    from megarlhf.generate import run_generate

    cfg = load_config(GenerateConfig, None, overrides)
    run_generate(cfg)
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    return [json.loads(line) for line in open(cfg.output_path)]


def test_samples_do_not_depend_on_layout_or_batch(world2, tmp_path):
    from megarlhf.data import load_tokenizer, train_sentencepiece, write_synthetic

    paths = write_synthetic(tmp_path / "task", seed=0)
    tok_path = train_sentencepiece([str(paths["tokenizer_corpus"])], str(tmp_path / "sp"), 64)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open(paths["prompts_test"]).readlines()[:3]))
    world2.run(save_tiny, str(tmp_path / "ckpt"), load_tokenizer(tok_path).vocab_size)
    common = [f"model_path={tmp_path / 'ckpt'}", f"prompts={prompts}", f"data.tokenizer={tok_path}", "n=2",
              "temperature=1.0", "max_new_tokens=8", "reward_fn=gsm8k_flexible", "seed=5"]  # fmt: skip
    tp2 = world2.run(generate_case, common + ["layout.tp=2", "batch_size=6", f"output={tmp_path / 'tp2.jsonl'}"])[0]
    dp2 = world2.run(generate_case, common + ["layout.tp=1", "batch_size=1", f"output={tmp_path / 'dp2.jsonl'}"])[0]
    assert [(r["index"], r["sample"]) for r in tp2] == [(i, j) for i in range(3) for j in range(2)]
    assert tp2 == dp2
    assert any(tp2[2 * i]["response_ids"] != tp2[2 * i + 1]["response_ids"] for i in range(3))  # samples differ
