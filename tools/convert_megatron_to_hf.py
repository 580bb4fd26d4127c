#!/usr/bin/env python
"""Convert a megarlhf checkpoint (any TP/PP) into a Hugging Face model folder (safetensors).

    python tools/convert_megatron_to_hf.py runs/sft out/sft-hf
    python tools/convert_megatron_to_hf.py runs/rm out/rm-hf --pad-token-id 0

CHECKPOINT is a run directory, its checkpoints/ folder or one iter_NNNNNNN folder.
The policy (role 'actor', LM head) becomes *ForCausalLM. A reward model or critic (role
'reward' / 'critic', value head) becomes *ForSequenceClassification with num_labels=1
whose `score` is the value head; transformers scores the last token that is not
pad_token_id, so set --pad-token-id for batched scoring (megarlhf reads the value at the
last non-pad token too).

Where things come from:
- the ModelConfig: --model-config, else RUN/model_config.yaml (written with every
  weights-only checkpoint), else the `model:` section of RUN/config.yaml (a training run);
- the HF template: --hf-template, else RUN/hf or RUN/hf_init/hf when present (the
  original config.json and tokenizer files, copied along; their model_type picks the
  family); without one, the family is qwen2 for models with q/k/v biases, else llama.

Writes config.json, model.safetensors (or model-0000i-of-0000n.safetensors plus
model.safetensors.index.json above --max-shard-size) and the template's other files.
The padded vocabulary rows are dropped. Holds one copy of the model plus one shard.
Exit code 2: bad arguments or an unsupported model, including a value head saved before
megarlhf's value head lost its bias with a bias that is not exactly 0 (HF's score has
none); 3: a checkpoint that cannot be loaded.
"""

from __future__ import annotations

import os

# Conversion is memory-bound work on CPU; a large model would not fit one GPU anyway.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

VALUE_ROLES = ("reward", "critic")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run dir, checkpoints/ folder or iter_NNNNNNN folder")
    p.add_argument("out", type=Path, help="output Hugging Face folder")
    p.add_argument("--role", help="model to export (default: the only one in the checkpoint)")
    p.add_argument("--model-config", type=Path, metavar="FILE",
                   help="YAML with the ModelConfig (default: found next to the checkpoint)")
    p.add_argument("--hf-template", type=Path, metavar="DIR",
                   help="HF folder whose config.json and tokenizer files to start from")
    p.add_argument("--family", choices=["auto", "llama", "mistral", "qwen2"], default="auto",
                   help="HF architecture family (default: from the template, else by q/k/v bias)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the written tensors (default: the model's params_dtype)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="largest safetensors file in GB (default: 5)")
    p.add_argument("--pad-token-id", type=int, metavar="ID",
                   help="pad_token_id to write into config.json (reward models need one)")
    return p.parse_args(argv)  # fmt: skip


def find_model_config(run_dir: Path, given: Path | None):
    """The ModelConfig of a checkpoint (see the module docstring for the search order)."""
    import yaml

    from megarlhf.config import ConfigError, ModelConfig, load_config
    from megarlhf.config.loader import build

    if given is not None:
        return load_config(ModelConfig, given)
    if (run_dir / "model_config.yaml").is_file():
        return load_config(ModelConfig, run_dir / "model_config.yaml")
    if (run_dir / "config.yaml").is_file():
        return build(ModelConfig, yaml.safe_load((run_dir / "config.yaml").read_text())["model"], prefix="model.")
    raise ConfigError(f"no model_config.yaml or config.yaml in {run_dir}: pass --model-config FILE")


def pick_role(ckpt: Path, role: str | None) -> str:
    from megarlhf.config import ConfigError

    found = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and p.name != "rng")
    if role is None and len(found) == 1:
        return found[0]
    if role is None or role not in found:
        raise ConfigError(f"{ckpt} holds the models {found}: pass --role with one of them")
    return role


def check_legacy_value_bias(ckpt: Path, role: str) -> None:
    """Value heads used to have a bias, which HF's score layer cannot hold. A checkpoint
    from then loads without it: fine when it is exactly 0 (never trained, or converted from
    HF), an error otherwise, since every exported score would shift by it."""
    from megarlhf.checkpoint.dist_ckpt import read_saved_tensor
    from megarlhf.checkpoint.hf import ConversionError

    bias = read_saved_tensor(ckpt, role, "output_layer.bias")
    if bias is None:
        return
    if bias.any():
        raise ConversionError(
            f"{ckpt / role}: output_layer.bias = {bias.flatten().tolist()}. This value head was trained "
            "before megarlhf removed its bias; HF's score layer has none, so every exported score would "
            "shift by it. The --drop-score-bias flag that exported such checkpoints no longer exists: "
            "retrain the model with this megarlhf (or export with the megarlhf version it was trained with)"
        )
    print(f"note: {ckpt / role} holds an all-zero output_layer.bias from an older megarlhf: dropped")


def shard_files(sizes: dict[str, int], max_bytes: float) -> dict[str, str]:
    """{HF tensor: file name}, filling files in order up to max_bytes (HF's file naming)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    if len(shards) == 1:
        return dict.fromkeys(shards[0], "model.safetensors")
    n = len(shards)
    return {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, names in enumerate(shards) for name in names}


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import save_file
    from megarlhf.output import progress_bar

    from megarlhf.checkpoint.dist_ckpt import CheckpointError, load_model_weights, resolve_checkpoint
    from megarlhf.checkpoint.hf import copy_hf_metadata, hf_config, hf_shape, read_hf_config, to_hf, weight_plan
    from megarlhf.config import ConfigError
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        run_dir = ckpt.parent.parent
        cfg = find_model_config(run_dir, args.model_config)
        role = pick_role(ckpt, args.role)
        head = "value" if role in VALUE_ROLES else "lm"
        found = [d for d in (run_dir / "hf", run_dir / "hf_init" / "hf") if d.is_dir()]
        template = args.hf_template or (found[0] if found else None)
        base = read_hf_config(template) if template else None
        family = args.family
        if family == "auto":
            family = (base or {}).get("model_type") or ("qwen2" if cfg.add_qkv_bias else "llama")
        dtype = cfg.params_dtype if args.dtype == "auto" else args.dtype
        config = hf_config(cfg, family, head, base=base, pad_token_id=args.pad_token_id, dtype=dtype)
        if init_distributed().world_size != 1:
            raise ConfigError("run the converter as a single process (not under torchrun/srun)")
        groups = build_parallel_context({role: Layout(1, 1)})[role]
        seed_all(0, groups)
        model = build_model(cfg, groups, head)
        load_model_weights(model, groups, ckpt, role)
        print(f"{ckpt / role}: {role} ({head} head), {cfg.num_parameters(head) / 1e6:.1f}M parameters -> "
              f"{config['architectures'][0]}, {dtype}")  # fmt: skip

        if head == "value":  # before any file is written
            check_legacy_value_bias(ckpt, role)

        params = dict(model.named_parameters())
        plan = weight_plan(cfg, head)
        itemsize = _ITEMSIZE[dtype]
        sizes = {src: itemsize * torch.Size(hf_shape(src, cfg)).numel() for name in params for src in plan[name].hf}
        where = shard_files(sizes, args.max_shard_size * 1e9)
        args.out.mkdir(parents=True, exist_ok=True)
        buffer: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in progress_bar(params.items(), desc="megatron -> hf", unit="tensor"):
                for src, t in to_hf(plan[name], param.detach(), cfg).items():
                    if buffer and where[next(iter(buffer))] != where[src]:  # the previous file is complete
                        save_file(buffer, args.out / where[next(iter(buffer))], metadata={"format": "pt"})
                        buffer = {}
                    buffer[src] = t.to(getattr(torch, dtype)).contiguous()
            save_file(buffer, args.out / where[next(iter(buffer))], metadata={"format": "pt"})
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(set(where.values())) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": where}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copied = copy_hf_metadata(template, args.out, skip=("config.json",)) if template else []
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if head == "value" and config.get("pad_token_id") is None:
        print("note: config.json has no pad_token_id: transformers then scores only batches without padding")
    print(f"wrote {args.out}: config.json, {len(set(where.values()))} safetensors file(s)"
          + (f", {', '.join(copied)} from {template}" if copied else ""))  # fmt: skip
    print(f"time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
