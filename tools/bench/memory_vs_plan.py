#!/usr/bin/env python
"""Measured vs planned per-rank memory of a megarlhf training step (CPU, float32).

Runs `TrainEngine.train_step` (Megatron DDP + Megatron's Adam, the engine every trainer
uses) on random tokens with the SFT loss, at a TP layout under torchrun, and compares the
memory each rank used with what `megarlhf.plan.memory` predicts for the same shape:

    python tools/bench/memory_vs_plan.py --layers 6 --hidden 512 --heads 8 --ffn 1536 --vocab 1024
    torchrun --nproc-per-node 2 tools/bench/memory_vs_plan.py --tp 2 ...

What is measured, per rank, relative to a baseline taken after imports, process groups
and the CPU layer are set up (before the model is built):
- peak RSS: the kernel's high-water mark (VmHWM) minus the baseline RSS: what the OS had to
  provide, including allocator caching and fragmentation;
- peak malloc'd: the most bytes glibc reported in use (mallinfo2 uordblks + hblkhd),
  sampled every 5 ms by a thread and at the end of every forward pass: live tensor
  bytes (and small Python objects), without the allocator's cached free memory.
By default the bench fixes glibc's mmap threshold at 128 KiB (`--glibc-default` keeps the
dynamic one), so that freed tensors leave RSS as they do on a GPU's caching allocator after
`empty_cache`; peak malloc'd does not depend on it.
The prediction is weights + fp32 grad buffer + Adam states + the activations of one
microbatch (+ loss head); the planner's GPU-only runtime overhead is not included on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloced() -> int:
    """Bytes glibc has handed out and not had back (heap in use + mmapped chunks)."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Serve every allocation above `nbytes` with its own mmap, returned to the OS on free.

    Setting the threshold explicitly turns off glibc's dynamic threshold, which otherwise
    rises to the largest freed block (up to 32 MiB) and keeps later tensors on the heap,
    where freed memory stays resident. Same effect as MALLOC_MMAP_THRESHOLD_=131072."""
    _libc.mallopt(M_MMAP_THRESHOLD, nbytes)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """Background thread: the largest `malloced()` seen while running."""

    def __init__(self, period_s: float = 5e-3):
        self.peak = malloced()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s):
        while not self._stop.is_set():
            self.note()
            time.sleep(period_s)

    def note(self) -> None:
        self.peak = max(self.peak, malloced())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=1, help="per optimizer step and DP rank")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's dynamic mmap threshold (peak RSS then includes freed heap memory)")
    p.add_argument("--json", default=None, help="append the result (one JSON object) to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if not args.glibc_default:
        fix_mmap_threshold()
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    import torch.distributed as dist

    from megarlhf.config import ModelConfig, OptimConfig
    from megarlhf.engine.engine import TrainEngine
    from megarlhf.models.backbone import build_model
    from megarlhf.models.logprobs import logprobs_and_entropy
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all
    from megarlhf.plan.memory import model_states, training_activations
    from megarlhf.plan.shapes import stage_parameters

    init_distributed()
    cfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_seq_length=args.seq, params_dtype="float32",
    )  # fmt: skip
    groups = build_parallel_context({"actor": Layout(args.tp, 1)})["actor"]
    seed_all(0, groups)
    b, s = args.micro_batch, args.seq
    g = torch.Generator().manual_seed(0)
    microbatches = [
        {"tokens": (t := torch.randint(0, cfg.vocab_size, (b, s), generator=g)), "position_ids": torch.arange(s).expand(b, s).contiguous()}
        for _ in range(args.microbatches)
    ]  # fmt: skip
    n_tokens = torch.tensor(float(b * (s - 1) * args.microbatches * groups.layout.dp))
    dist.barrier()
    base_rss = status_kib("VmRSS") * 1024
    base_malloc = malloced()

    with PeakSampler() as sampler:
        engine = TrainEngine(build_model(cfg, groups, "lm"), groups,
                             OptimConfig(use_distributed_optimizer=args.distributed_optimizer), args.steps)  # fmt: skip
        built = malloced() - base_malloc
        forward_end = []

        def loss_fn(output, batch):
            lp, _ = logprobs_and_entropy(output[:, :-1], batch["tokens"][:, 1:], tp_group=groups.tp, vocab_size=cfg.vocab_size)
            loss = -lp.sum() / n_tokens
            forward_end.append(malloced() - base_malloc)  # every activation of the step is alive here
            sampler.note()
            return loss, {}

        step_s = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.train_step(microbatches, loss_fn)
            step_s.append(time.perf_counter() - t0)
            sampler.note()
    measured = {
        "peak_rss_delta": status_kib("VmHWM") * 1024 - base_rss,
        "peak_malloced_delta": sampler.peak - base_malloc,
        "malloced_after_build": built,
        "malloced_at_forward_end_last_step": forward_end[-1],
        "step_s": round(min(step_s), 3),
        "rank_parameters": sum(p.numel() for p in engine.module.parameters()),
    }
    states = model_states(cfg, args.tp, 1, groups.layout.dp, trainable=True, distributed_optimizer=args.distributed_optimizer)
    act = training_activations(cfg, args.tp, 1, micro_batch=b, seq=s, microbatches=args.microbatches, impl="cpu")
    predicted = {
        "weights": states.weights, "grads": states.grads, "optimizer": states.optimizer,
        "activations": act.layers, "loss_head": act.head, "total": states.total + act.total,
        "rank_parameters": stage_parameters(cfg, args.tp, 1)[0],
    }  # fmt: skip
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, measured)
    result = None
    if dist.get_rank() == 0:
        worst = max(rows, key=lambda r: r["peak_rss_delta"])
        result = {
            "model": f"L{args.layers} h{args.hidden} heads{args.heads} ffn{cfg.ffn_size} vocab{cfg.padded_vocab_size}",
            "parameters_M": round(cfg.num_parameters() / 1e6, 2),
            "layout": str(groups.layout),
            "micro_batch": b, "seq": s, "microbatches": args.microbatches,
            "allocator": "glibc default" if args.glibc_default else "glibc, mmap threshold 128 KiB",
            "predicted_MiB": {k: round(v / 2**20, 1) if k != "rank_parameters" else v for k, v in predicted.items()},
            "measured_MiB_per_rank": [
                {k: round(v / 2**20, 1) if k not in ("step_s", "rank_parameters") else v for k, v in r.items()} for r in rows
            ],
            "rss_error": round(worst["peak_rss_delta"] / predicted["total"] - 1, 3),
            "malloc_error": round(max(r["peak_malloced_delta"] for r in rows) / predicted["total"] - 1, 3),
        }  # fmt: skip
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
