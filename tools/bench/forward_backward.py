#!/usr/bin/env python
"""Forward+backward throughput of a Llama/GPT-style GPTModel at a TP/PP/DP layout.

Prints tokens/s and achieved TFLOP/s next to the machine's measured matmul peak (the
physical limit for this work), so later changes can be compared with it.

    python tools/bench/forward_backward.py                       # ~20M Llama, TP1
    torchrun --nproc-per-node 2 tools/bench/forward_backward.py --tp 2

FLOPs are model FLOPs (the MFU convention of Megatron/PaLM): 6 x matmul parameters per
token (embedding lookup excluded, LM head included) + 12 x layers x seq x hidden per token
for attention scores and values (full square, no causal discount).
On CPU the peak is a float32 `torch.mm` probe run by every rank at once, each with the
threads it trains with; on GPU it is the same probe in the model's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["llama", "gpt"], default="llama")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="query groups (GQA); default = heads")
    p.add_argument("--ffn", type=int, default=None, help="MLP width; default: the arch's rule")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=1, help="per step, per DP rank")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attention", choices=["sdpa", "unfused"], default="sdpa")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def matmul_peak_flops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on this process's threads."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_flops_per_token(cfg, seq: int) -> float:
    h, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    kv = h // cfg.num_attention_heads * cfg.query_groups
    per_layer = h * (h + 2 * kv) + h * h + h * f * (3 if cfg.arch == "llama" else 2)
    matmul_params = L * per_layer + h * cfg.padded_vocab_size
    return 6 * matmul_params + 12 * L * seq * h


def main(argv=None) -> None:
    args = parse_args(argv)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    import torch.distributed as dist

    from megarlhf.config import ModelConfig
    from megarlhf.engine.schedule import run_microbatches, wrap_ddp, zero_grads
    from megarlhf.models.backbone import build_model
    from megarlhf.models.logprobs import logprobs_and_entropy
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all

    init_distributed()
    on_gpu = torch.cuda.is_available()
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    cfg = ModelConfig(
        arch=args.arch, num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_seq_length=args.seq, params_dtype=dtype_name, attention_backend=args.attention,
    )  # fmt: skip
    groups = build_parallel_context({"actor": Layout(args.tp, args.pp)})["actor"]
    seed_all(0, groups)
    model = wrap_ddp(build_model(cfg, groups, "lm"), groups)
    device = "cuda" if on_gpu else "cpu"

    b, s = args.micro_batch, args.seq
    tokens = torch.randint(0, cfg.vocab_size, (b, s), device=device)
    mb = {"tokens": tokens, "position_ids": torch.arange(s, device=device).expand(b, s).contiguous()}
    n_tokens = float(b * (s - 1) * args.microbatches * groups.layout.dp)

    def loss_fn(output, batch):
        lp, _ = logprobs_and_entropy(output[:, :-1], batch["tokens"][:, 1:], tp_group=groups.tp, vocab_size=cfg.vocab_size)
        return -lp.sum() / n_tokens, {}

    times = []
    for step in range(args.warmup + args.steps):
        zero_grads(model)
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        run_microbatches(model, groups, [mb] * args.microbatches, loss_fn)
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)

    dist.barrier()
    peak = torch.tensor(matmul_peak_flops(cfg_dtype := getattr(torch, dtype_name), device), dtype=torch.float64)
    dist.all_reduce(peak)  # every rank probed at the same time: the machine's aggregate peak
    tokens_per_step = b * s * args.microbatches * groups.layout.dp
    step_s = statistics.median(times)
    achieved = model_flops_per_token(cfg, s) * tokens_per_step / step_s
    result = {
        "model": f"{args.arch} L{args.layers} h{args.hidden} heads{args.heads} ffn{cfg.ffn_size} vocab{cfg.padded_vocab_size}",
        "parameters_M": round(cfg.num_parameters() / 1e6, 2),
        "layout": str(groups.layout),
        "world_size": dist.get_world_size(),
        "threads_per_rank": torch.get_num_threads() if not on_gpu else None,
        "dtype": str(cfg_dtype).replace("torch.", ""),
        "tokens_per_step": tokens_per_step,
        "step_s_median": round(step_s, 4),
        "step_s_best": round(min(times), 4),
        "tokens_per_s": round(tokens_per_step / step_s, 1),
        "achieved_tflops": round(achieved / 1e12, 4),
        "matmul_peak_tflops": round(peak.item() / 1e12, 4),
        "fraction_of_peak": round(achieved / peak.item(), 3),
    }
    if dist.get_rank() == 0:
        width = max(map(len, result))
        for k, v in result.items():
            print(f"{k:<{width}}  {v}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
