#!/usr/bin/env python
"""Convert a Hugging Face model folder into a megarlhf checkpoint (Megatron dist_checkpointing).

    python tools/convert_hf_to_megatron.py /models/Llama-3.2-1B out/llama1b
    megarlhf sft --config sft.yaml init_from=out/llama1b data.train_file=chat.jsonl

Reads config.json and model.safetensors (or the shards listed in
model.safetensors.index.json) shard by shard, tensor by tensor, and writes

    OUT/checkpoints/iter_0000000/actor/   the weights (reward/ for a *ForSequenceClassification)
    OUT/checkpoints/latest
    OUT/model_config.yaml                 megarlhf's ModelConfig of these weights
    OUT/hf/                               every file of the folder but the weights: config.json,
                                          tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                                          chat_template.jinja, generation_config.json

The checkpoint loads at any TP/PP (`init_from=OUT`, or `load_model_weights`). `init_from=OUT`
(or sft_model_path=OUT) is all a stage needs: the model shape comes from model_config.yaml,
the tokenizer, special tokens and chat template from hf/ (docs/bring-your-own-model.md). Supported: Llama, Mistral and Qwen2
(*ForCausalLM; *ForSequenceClassification with num_labels=1 as a reward model), with
plain RoPE or Llama 3.1/3.2's 'llama3' RoPE scaling (other rope types are refused).
Runs on CPU and holds one copy of the model (plus the HF tensors of one shard at most).
Exit code 2: unsupported architecture or option, a missing tensor or a shape mismatch
(the message names the config key or tensor and both shapes).
"""

from __future__ import annotations

import os

# Conversion is memory-bound work on CPU; a large model would not fit one GPU anyway.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("out", type=Path, help="output folder (a megarlhf run directory layout)")
    p.add_argument("--role", help="model name in the checkpoint (default: actor, or reward for a reward model)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="pad the vocabulary to a multiple of N with zero rows (default: 128)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="parameter dtype of the checkpoint (default: auto = the HF config's dtype)")
    return p.parse_args(argv)  # fmt: skip


def peak_rss_gib() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest child (checkpoint writers), GiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib[0] / 2**20, kib[1] / 2**20


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from megarlhf.checkpoint.dist_ckpt import save_model_weights
    from megarlhf.checkpoint import hf as mapping
    from megarlhf.config import ConfigError
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all

    try:
        dtype = None if args.dtype == "auto" else args.dtype
        hf = mapping.model_config_from_hf(
            mapping.read_hf_config(args.src),
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            params_dtype=dtype,
        )
        role = args.role or ("reward" if hf.head == "value" else "actor")
        cfg = hf.config
        print(f"{args.src}: {hf.family} {'reward model' if hf.head == 'value' else 'causal LM'}, "
              f"{cfg.num_parameters(hf.head) / 1e6:.1f}M parameters (vocab {cfg.vocab_size} padded to "
              f"{cfg.padded_vocab_size}), {cfg.params_dtype}")  # fmt: skip
        for note in hf.notes:
            print(f"note: {note}")
        if init_distributed().world_size != 1:
            raise ConfigError("run the converter as a single process (not under torchrun/srun)")
        groups = build_parallel_context({role: Layout(1, 1)})[role]
        seed_all(0, groups)
        model = build_model(cfg, groups, hf.head)
        mapping.load_hf_weights(model, groups, args.src, strict=True, progress=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"writing {args.out} ...", flush=True)
    path = save_model_weights(model, groups, args.out, role, source=f"hf:{args.src.resolve()}")
    copied = mapping.copy_hf_metadata(args.src, args.out / "hf")
    rss, child = peak_rss_gib()
    print(f"wrote {path / role} and {args.out / 'model_config.yaml'}; copied {', '.join(copied)} to {args.out / 'hf'}")
    print(f"time {time.perf_counter() - t0:.1f} s, peak RSS {rss:.2f} GiB (largest child process {child:.2f} GiB)")
    print(f"use: init_from={args.out} (model shape from model_config.yaml, tokenizer and chat template from hf/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
