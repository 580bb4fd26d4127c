#!/usr/bin/env python
"""Generation throughput: megarlhf's KV-cache engine vs `transformers.generate` on the same weights.

    python tools/bench/generation_vs_hf.py                          # batch 1, 8, 32; ~20M Llama
    python tools/bench/generation_vs_hf.py --batch 8 --new 64 --layers 2 --hidden 128

A random Llama is built with transformers (no download), saved with `save_pretrained`, and
loaded into a megarlhf GPTModel through the HF converter, so both sides run identical
weights. Both sides generate greedily (every sequence runs to --new tokens: EOS is set to
an id outside the vocabulary) with the KV cache on; tokens/s = generated tokens / wall
time, best of --repeats, after one warm-up. The greedy outputs are compared as a check.
On a GPU both run there (the model's dtype is float32 unless --bf16); --cuda-graphs
replays megarlhf's decode steps from a CUDA graph (on CPU: the same fixed-shape step,
eagerly). --compile runs megarlhf's prefill and decode step through torch.compile
(generation.compile=true); --hf-compile gives transformers the same: its static cache
and compiled forward (on CPU too). The warm-up call, which pays any compile, is
reported separately ("first call").

--profile (CPU) runs one more call of each side under torch.profiler and reports the seconds
spent in matrix-product kernels (aten::mm/addmm/bmm, self time): both sides multiply the
same weights, so HF's best time over its own matmul time bounds the ratio any engine can
reach on these weights without changing the arithmetic ("ratio bound").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cuda-graphs", action="store_true", help="megarlhf: generation.cuda_graphs=true")
    p.add_argument("--compile", action="store_true", help="megarlhf: generation.compile=true")
    p.add_argument("--hf-compile", action="store_true", help="transformers: static cache + compiled forward")
    p.add_argument("--bf16", action="store_true", help="GPU: both sides in bfloat16")
    p.add_argument("--profile", action="store_true",
                   help="also time each side's matrix products (one profiled call) and print the ratio bound")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def _clock(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call's seconds: warm-up and any compile, best of `repeats` after it, output)"""
    first, _ = _clock(fn)
    best, out = float("inf"), None
    for _ in range(repeats):
        seconds, out = _clock(fn)
        best = min(best, seconds)
    return first, best, out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_seconds(fn) -> tuple[float, float]:
    """(self time of the matrix-product kernels, wall time) of one call of `fn` under
    torch.profiler (CPU). The wall time is that call's own, profiler overhead included: the
    kernels' share of it is exact, while their share of an unprofiled call is an estimate."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6, wall


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.profile and torch.cuda.is_available():
        raise SystemExit("--profile times CPU kernels only; on a GPU use nsys or torch.profiler with CUDA activity")
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from megarlhf.checkpoint.hf import load_hf_weights, model_config_from_hf, read_hf_config
    from megarlhf.models.backbone import build_model
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all
    from megarlhf.rollout.engine import GenerationEngine
    from megarlhf.rollout.sampling import SamplingParams

    init_distributed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if args.bf16 and device == "cuda" else "float32"
    groups = build_parallel_context({"actor": Layout(1, 1)})["actor"]
    seed_all(0, groups)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new, tie_word_embeddings=False,
    )).eval()  # fmt: skip
    hf = hf.to(device=device, dtype=getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        cfg = model_config_from_hf(read_hf_config(tmp)).config
        cfg = dataclasses.replace(cfg, params_dtype=dtype)
        model = build_model(cfg, groups, "lm")
        load_hf_weights(model, groups, tmp)
    model.eval()
    never = args.vocab + 7  # an EOS no sequence can produce: every row runs to --new tokens
    engine = GenerationEngine(
        model, groups, vocab_size=args.vocab, eos_id=never, pad_id=0, cuda_graphs=args.cuda_graphs,
        compile=args.compile,
    )
    hf_extra = {}
    if args.hf_compile:
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=False, mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only, unless told
        hf_extra = {"cache_implementation": "static", "compile_config": compile_config}
    params = SamplingParams(max_new_tokens=args.new, temperature=0)

    rows = []
    for b in args.batch:
        prompts = torch.randint(0, args.vocab, (b, args.prompt), generator=torch.Generator().manual_seed(b)).to(device)
        ours_first, ours_s, ours = timed(lambda: engine.generate(prompts.tolist(), params, [0] * b), args.repeats)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(
                    prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                    min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
                    **hf_extra,
                )  # fmt: skip

        hf_first, hf_s, hf_out = timed(hf_generate, args.repeats)
        same = torch.equal(ours.tokens[:, : args.prompt + args.new], hf_out.cpu())
        tokens = b * args.new
        profiled = {}
        if args.profile:
            ours_mm, ours_prof_s = matmul_seconds(lambda: engine.generate(prompts.tolist(), params, [0] * b))
            hf_mm, hf_prof_s = matmul_seconds(hf_generate)
            profiled = {
                "megarlhf_matmul_s": round(ours_mm, 4), "hf_matmul_s": round(hf_mm, 4),
                "megarlhf_profiled_call_s": round(ours_prof_s, 4), "hf_profiled_call_s": round(hf_prof_s, 4),
                "megarlhf_matmul_share": round(ours_mm / ours_s, 3), "hf_matmul_share": round(hf_mm / hf_s, 3),
                "ratio_bound": round(hf_s / hf_mm, 2) if hf_mm > 0 else None,
            }  # fmt: skip
        rows.append({
            "batch": b, "megarlhf_tokens_per_s": round(tokens / ours_s, 1),
            "hf_tokens_per_s": round(tokens / hf_s, 1), "ratio": round(hf_s / ours_s, 2), "same_greedy_tokens": same,
            "megarlhf_first_call_s": round(ours_first, 2), "hf_first_call_s": round(hf_first, 2), **profiled,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel: Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} KV, "
          f"ffn {args.ffn}, vocab {args.vocab} ({cfg.num_parameters() / 1e6:.1f}M params); prompt {args.prompt}, "
          f"new {args.new}, {device} ({args.threads} threads), {dtype}, megarlhf cuda_graphs={args.cuda_graphs} "
          f"compile={args.compile}, HF compile={args.hf_compile}, best of {args.repeats}")  # fmt: skip
    print(f"{'batch':>5}  {'megarlhf tok/s':>14}  {'HF generate tok/s':>17}  {'ratio':>6}  "
          f"{'first call s (ours / HF)':>24}  same greedy tokens")  # fmt: skip
    for r in rows:
        first = f"{r['megarlhf_first_call_s']:.2f} / {r['hf_first_call_s']:.2f}"
        print(f"{r['batch']:>5}  {r['megarlhf_tokens_per_s']:>14,.0f}  {r['hf_tokens_per_s']:>17,.0f}  "
              f"{r['ratio']:>5.2f}x  {first:>24}  {r['same_greedy_tokens']}")  # fmt: skip
    if args.profile:
        print("\nmatrix products (aten::mm/addmm/bmm self time, one profiled call; share of the best call's time):")
        header = f"{'batch':>5}  {'megarlhf s':>10}  {'share':>5}  {'HF s':>6}  {'share':>5}"
        print(f"{header}  ratio bound (HF time / HF matmul time)")
        for r in rows:
            bound = f"{r['ratio_bound']:.2f}x" if r["ratio_bound"] else "-"
            print(f"{r['batch']:>5}  {r['megarlhf_matmul_s']:>10.3f}  {r['megarlhf_matmul_share']:>5.0%}  "
                  f"{r['hf_matmul_s']:>6.3f}  {r['hf_matmul_share']:>5.0%}  {bound}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
