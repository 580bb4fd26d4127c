#!/usr/bin/env python
"""Checkpoint save / verify / load time with and without checksums (one rank).

    python tools/bench/checkpoint_checksums.py                      # ~100M-parameter Llama, fp32 + Adam
    python tools/bench/checkpoint_checksums.py --layers 2 --hidden 64 --vocab 256   # a quick check

Builds the model, takes one optimizer step (so Adam's moments exist and are saved), then
`--repeats` times: `save_checkpoint` (which hashes every file: reported as "save" and its
"checksum" part, and "save without checksums" = the difference), `verify_checkpoint` on
one process (size + xxh3 of every file, what `megarlhf checkpoint verify` does), and
`load_checkpoint`. Best of the repeats. Files just written sit in the page cache, so the
hashing and verifying read memory, not the disk: on a cold cache verify is bounded by
the disk's read speed instead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()

    import torch

    import megarlhf.checkpoint.dist_ckpt as ck
    from megarlhf.checkpoint.verify import describe_files, list_files, verify_checkpoint
    from megarlhf.config import ModelConfig, OptimConfig
    from megarlhf.engine.engine import TrainEngine
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, init_distributed
    from megarlhf.parallel.layout import build_role_groups

    init_distributed()
    groups = build_role_groups(Layout(1, 1))
    cfg = ModelConfig(
        arch="llama", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=12 if args.hidden % 12 == 0 else 4,
        num_query_groups=4, ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab, max_seq_length=64,
    )  # fmt: skip
    engine = TrainEngine(build_model(cfg, groups, "lm"), groups, OptimConfig(), max_steps=10)
    params = sum(p.numel() for p in engine.module.parameters())
    tokens = torch.randint(0, args.vocab, (1, 16))
    mb = {"tokens": tokens, "position_ids": torch.arange(16)[None]}
    engine.train_step([mb], lambda out, mb: (out.float().mean(), {}))

    hash_seconds: list[float] = []
    real_write = ck._write_checksums

    def timed_write(ckpt):
        t = time.perf_counter()
        real_write(ckpt)
        hash_seconds.append(time.perf_counter() - t)

    ck._write_checksums = timed_write
    best = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        for r in range(args.repeats):
            t = time.perf_counter()
            path = ck.save_checkpoint(run_dir, r + 1, {"actor": engine}, {}, keep=1)
            save = time.perf_counter() - t
            t = time.perf_counter()
            problems, files = verify_checkpoint(path)
            verify = time.perf_counter() - t
            assert not problems, problems
            t = time.perf_counter()
            ck.load_checkpoint(path, {"actor": engine})
            load = time.perf_counter() - t
            size = sum(v["size"] for v in describe_files(path, list_files(path)).values())
            for k, v in {"save": save, "checksum": hash_seconds[-1], "save without checksums": save - hash_seconds[-1],
                         "verify": verify, "load (unverified)": load}.items():  # fmt: skip
                best[k] = min(best.get(k, float("inf")), v)
    print(f"{params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB in {files} files, best of {args.repeats}:")
    for k, v in best.items():
        print(f"  {k:<24} {v:7.3f} s" + (f"  ({size / 2**20 / v:.0f} MiB/s)" if k in ("checksum", "verify") else ""))


if __name__ == "__main__":
    main()
