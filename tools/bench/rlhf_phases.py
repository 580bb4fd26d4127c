#!/usr/bin/env python
"""Throughput of an RLHF stage per phase: PPO, GRPO or DPO, at any size and layout.

    python tools/bench/rlhf_phases.py --stage ppo                              # the tiny example model
    python tools/bench/rlhf_phases.py --stage grpo --model 20m --steps 6       # ~20M-parameter Llama
    python tools/bench/rlhf_phases.py --stage ppo --nproc 2 --set layout.tp=2  # 2 ranks (torchrun)
    python tools/bench/rlhf_phases.py --stage dpo --json out.json

Runs --steps iterations (PPO/GRPO: generate .. refit; DPO: optimizer steps) of
examples/<stage>_tiny.yaml plus --set overrides, in a fresh `torchrun` world of --nproc
ranks, and prints per phase the median seconds, share of the step and achieved TFLOP/s,
then per step: generated and trained tokens/s, samples/s, achieved TFLOP/s, MFU and the
peak memory of every rank; --json writes the same, with every step.

Set-up (kept in --work-dir when present): the synthetic sorting task and its tokenizer,
a short SFT policy (--sft-steps) and, for PPO, a reward model from it (--rm-steps), at
the --model size. Weights barely matter for speed, but response lengths do: a policy
that has not learnt to stop generates to generation.response_length.

Phases are the trainers' own timers (`time/*` in metrics.jsonl): generate, score/reward,
score/reference, score/actor (sampling-time log-probs: ~0 unless generation.old_logprobs
is 'recompute'), score/critic, advantages,
train/actor, train/critic (GRPO: train), refit; DPO: reference (collating a step's
microbatches, whose reference log-probs are computed there) and train. "other" is the
step's wall time not inside a phase; the check line says whether the phases add up to
the step within 5%.

FLOPs are model FLOPs of the useful (non-pad) tokens, megarlhf.plan.shapes.forward_flops:
2 x matmul parameters per token plus causal attention (4 x layers x hidden x s/2 per token
of a length-s row); generation is counted as one causal forward over each row (what the KV
cache computes), training as 3 forwards (forward + backward). Padding, recompute and the
optimizer are not counted, so MFU is the share of the peak that did useful work. Peak per
rank: a best-of-5 2048^3 float32 matmul on that rank's threads, all ranks at once (CPU),
or the device's dense bf16 peak from megarlhf.plan.hardware (GPU). Memory: peak RSS of each
rank's process (CPU; ru_maxrss) or torch.cuda.max_memory_allocated (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

STAGES = {"ppo": "examples/ppo_tiny.yaml", "grpo": "examples/grpo_tiny.yaml", "dpo": "examples/dpo_tiny.yaml"}
MODELS = {
    "tiny": [],  # the examples' 0.6M-parameter Llama
    "20m": ["model.num_layers=6", "model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=4",
            "model.ffn_hidden_size=1536"],
    # ~1B parameters (TinyLlama's shape), bf16: tools/gpu_check.sh's GPU figures
    "1b": ["model.num_layers=22", "model.hidden_size=2048", "model.num_attention_heads=32", "model.num_query_groups=4",
           "model.ffn_hidden_size=5632", "model.params_dtype=bfloat16"],
}  # fmt: skip
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGES), default="ppo", help="default: ppo")
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="policy (and reward/critic) size; default tiny")
    p.add_argument("--steps", type=int, default=6, help="iterations (PPO/GRPO) or optimizer steps (DPO); default 6")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians (default 1)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc-per-node); default 1")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / nproc)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the stage's example config (repeatable), e.g. layout.tp=2")
    p.add_argument("--work-dir", default="runs/bench_rlhf", help="data, SFT/RM runs and the stage's run go here")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps when training one (default 40)")
    p.add_argument("--rm-steps", type=int, default=20, help="reward-model steps when training one (default 20)")
    p.add_argument("--json", default=None, help="also write settings and figures to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the torchrun side
    args = p.parse_args(argv)  # fmt: skip
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return args


# --- the launching side -----------------------------------------------------------------
def clean_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    return env


def prepare(args, work: Path, env: dict) -> list[str]:
    """Data, tokenizer, SFT (and RM) runs at the --model size; returns the stage's overrides."""
    from sft_rm_dpo_vs_trl import prepare_data, run_logged

    data = work / "data"
    tokenizer = prepare_data(data)
    model = MODELS[args.model]
    runs = {"sft": work / f"sft_{args.model}", "rm": work / f"rm_{args.model}"}
    todo = [("sft", "examples/sft_tiny.yaml", "sft.jsonl", args.sft_steps, [])]
    if args.stage == "ppo":
        todo.append(("rm", "examples/rm_tiny.yaml", "prefs_train.jsonl", args.rm_steps, [f"init_from={runs['sft']}"]))
    for stage, yaml, train_file, steps, extra in todo:
        if (runs[stage] / "checkpoints" / "latest").is_file():
            continue
        print(f"[setup] {stage}: {steps} steps -> {runs[stage]}", flush=True)
        cmd = [sys.executable, "-m", "megarlhf", stage, "--config", yaml, *model, *extra,
               f"data.tokenizer={tokenizer}", f"data.train_file={data / train_file}", "data.eval_file=",
               f"train.run_dir={runs[stage]}", f"train.max_steps={steps}", "train.eval_steps=0"]  # fmt: skip
        run_logged(cmd, work / f"setup_{stage}_{args.model}.log", env)
    common = [*model, f"data.tokenizer={tokenizer}", "data.eval_file=", f"train.run_dir={work / args.stage}",
              f"train.max_steps={args.steps}", "train.eval_steps=0", "train.save_steps=0"]  # fmt: skip
    if args.stage == "dpo":
        return [*common, f"data.train_file={data / 'prefs_train.jsonl'}", f"init_from={runs['sft']}", "win_rate_prompts="]
    stage = [*common, f"data.train_file={data / 'prompts_train.jsonl'}", f"sft_model_path={runs['sft']}"]
    if args.stage == "ppo":
        stage += [f"reward_model_path={runs['rm']}", "value_model_path="]
    return stage


def launch(args) -> dict:
    work = (REPO / args.work_dir).resolve() if not Path(args.work_dir).is_absolute() else Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = clean_env(threads)
    overrides = prepare(args, work, env) + args.overrides
    out = work / f"result_{args.stage}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-port", str(29500 + os.getpid() % 1000), __file__, "--worker", str(out),
           "--stage", args.stage, "--steps", str(args.steps), "--warmup", str(args.warmup),
           *(a for o in overrides for a in ("--set", o))]  # fmt: skip
    log = work / f"{args.stage}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        sys.exit(f"error: the benchmark run exited {rc}; last lines of {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["settings"].update(model=args.model, nproc=args.nproc, threads_per_rank=threads)
    return result


# --- the measuring side (every rank, under torchrun) ------------------------------------
def peak_flops_per_rank() -> float:
    import torch

    if torch.cuda.is_available():
        from megarlhf.plan.hardware import get_gpu

        name = torch.cuda.get_device_name().upper()
        for key in ("B200", "H200", "H100", "A100"):
            if key in name:
                return get_gpu(key).bf16_flops
        raise SystemExit(f"error: no known dense bf16 peak for {name}")
    from forward_backward import matmul_peak_flops

    return matmul_peak_flops(torch.float32, "cpu")


def peak_memory_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row_flops(cfg, lengths, head: str) -> float:
    from megarlhf.plan.shapes import forward_flops

    return sum(forward_flops(cfg, s, s / 2, head) for s in lengths)


def rollout_step_flops(trainer, batch) -> dict[str, float]:
    """Model FLOPs per phase of one PPO/GRPO iteration on `batch`."""
    from megarlhf.checkpoint.dist_ckpt import checkpoint_model_config

    cfg = trainer.cfg
    lengths = batch["lengths"].tolist()
    policy = row_flops(cfg.model, lengths, "lm")
    flops = {"generate": policy, "train/actor": 3 * policy * trainer.passes}
    if trainer.reward is not None:
        flops["score/reward"] = row_flops(checkpoint_model_config(cfg.reward_model_path), lengths, "value")
    if trainer.reference is not None:
        flops["score/reference"] = policy
    # Sampling-time log-probs: an actor forward only under generation.old_logprobs=recompute.
    recompute = cfg.generation.old_logprobs == "recompute"
    if trainer.stage == "ppo":
        critic = row_flops(trainer.critic_model_config, lengths, "value")
        flops.update({"score/critic": critic, "train/critic": 3 * critic * trainer.passes})
        if recompute:
            flops["score/actor"] = policy
    else:
        if recompute and not trainer.on_policy:
            flops["score/actor"] = policy
        flops["train"] = flops.pop("train/actor")
    return flops


def measure_rollout(trainer, steps: int) -> list[dict]:
    out = []
    captured = {}
    update = trainer.update

    def capture(batch, items, timer=None):
        captured["batch"] = batch
        return update(batch, items, timer)

    trainer.update = capture
    for _ in range(steps):
        m = trainer.iteration()
        trainer.step += 1
        batch = captured["batch"]
        phases = {k[5:]: v for k, v in m.items() if k.startswith("time/") and k not in ("time/iteration", "time/refit_engine")}
        out.append({
            "seconds": m["time/iteration"], "phases": phases, "flops": rollout_step_flops(trainer, batch),
            "generated_tokens": m["tokens/generated"], "trained_tokens": m["tokens/trained"],
            "samples": int(batch["tokens"].shape[0]),
        })  # fmt: skip
    return out


def measure_dpo(trainer, steps: int) -> list[dict]:
    import time
    from functools import partial

    import torch
    import torch.distributed as dist

    out = []
    cfg = trainer.cfg.model
    for _ in range(steps):
        t0 = time.perf_counter()
        microbatches = trainer.next_microbatches()
        t1 = time.perf_counter()
        n, tokens, _ = trainer.global_counts(microbatches)
        trainer.engine.train_step(microbatches, partial(trainer.loss, n=n))
        trainer.step += 1
        t2 = time.perf_counter()
        # Rows of this rank's data-parallel share (the first TP/PP rank of each replica counts).
        lengths = [int(x) + 1 for mb in microbatches for x in mb["last_index"].tolist()]
        counts = trainer.groups.tp_rank == 0 and trainer.groups.pp_rank == 0
        local = torch.tensor([row_flops(cfg, lengths, "lm") if counts else 0.0, len(lengths) if counts else 0.0], dtype=torch.float64)
        dist.all_reduce(local)
        fwd, rows = local.tolist()
        out.append({
            "seconds": t2 - t0, "phases": {"reference": t1 - t0, "train": t2 - t1},
            "flops": {"reference": fwd, "train": 3 * fwd}, "generated_tokens": 0.0, "trained_tokens": float(tokens),
            "samples": rows / 2,
        })  # fmt: skip
    return out


def worker(args) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    import megarlhf.config as config_module
    from megarlhf.cli import STAGES as CLI_STAGES
    from megarlhf.config import load_config

    _, config_name, module, trainer_name = CLI_STAGES[args.stage]
    cfg = load_config(getattr(config_module, config_name), REPO / STAGES[args.stage], args.overrides)
    trainer = getattr(importlib.import_module(module), trainer_name)(cfg)
    if args.stage == "ppo":
        from megarlhf.checkpoint.dist_ckpt import checkpoint_model_config

        trainer.critic_model_config = checkpoint_model_config(cfg.value_model_path or cfg.reward_model_path) \
            if (cfg.value_model_path or cfg.reward_model_path) else cfg.model
    peak = torch.tensor([peak_flops_per_rank()], dtype=torch.float64)
    dist.all_reduce(peak)
    steps = measure_dpo(trainer, args.steps) if args.stage == "dpo" else measure_rollout(trainer, args.steps)
    memory = [None] * dist.get_world_size()
    dist.all_gather_object(memory, peak_memory_mib())
    trainer.run.close()
    if dist.get_rank() == 0:
        result = {
            "settings": {"stage": args.stage, "overrides": args.overrides, "world_size": dist.get_world_size(),
                         "parameters": cfg.model.num_parameters("lm"), "steps": args.steps, "warmup": args.warmup},
            "peak_flops": float(peak.item()), "peak_memory_mib_per_rank": memory, "per_step": steps,
        }  # fmt: skip
        Path(args.worker).write_text(json.dumps(result, indent=1))
    dist.barrier()


# --- figures ------------------------------------------------------------------------------
def leaves(names) -> list[str]:
    names = sorted(set(names))
    return [n for n in names if not any(o.startswith(n + "/") for o in names)]


def summarize(result: dict) -> dict:
    timed = result["per_step"][result["settings"]["warmup"] :]
    med = statistics.median
    phase_names = leaves(k for s in timed for k in s["phases"])
    phases = {}
    for name in phase_names:
        secs = [s["phases"].get(name, 0.0) for s in timed]
        flops = [s["flops"].get(name, 0.0) for s in timed]
        total = sum(secs)
        phases[name] = {"seconds": med(secs), "tflops": sum(flops) / total / 1e12 if total and sum(flops) else None}
    step = [s["seconds"] for s in timed]
    accounted = [sum(s["phases"].get(n, 0.0) for n in phase_names) for s in timed]
    total_s = sum(step)
    flops = sum(sum(s["flops"].values()) for s in timed)
    return {
        "step_seconds": med(step),
        "phases": phases,
        "other_seconds": med(a - b for a, b in zip(step, accounted)),
        "phases_over_step": sum(accounted) / total_s,
        "generated_tokens_per_second": sum(s["generated_tokens"] for s in timed) / total_s,
        "trained_tokens_per_second": sum(s["trained_tokens"] for s in timed) / total_s,
        "samples_per_second": sum(s["samples"] for s in timed) / total_s,
        "achieved_tflops": flops / total_s / 1e12,
        "mfu": flops / total_s / result["peak_flops"],
    }


def report(result: dict) -> None:
    s, fig = result["settings"], result["summary"]
    print(f"\n{s['stage']} on {s['world_size']} rank(s), {s['parameters'] / 1e6:.2f}M-parameter policy "
          f"({s['model']}), {s['steps']} steps ({s['warmup']} warm-up), {s['threads_per_rank']} threads per rank")  # fmt: skip
    if s["overrides"]:
        print("overrides: " + " ".join(o for o in s["overrides"] if not o.startswith(("data.", "train.run_dir"))))
    step = fig["step_seconds"]
    print(f"\n{'phase':<18}{'seconds':>10}{'share':>8}{'TFLOP/s':>10}")
    for name, p in fig["phases"].items():
        tf = f"{p['tflops']:.4f}" if p["tflops"] else "-"
        print(f"{name:<18}{p['seconds']:>10.3f}{p['seconds'] / step:>8.1%}{tf:>10}")
    print(f"{'other':<18}{fig['other_seconds']:>10.3f}{fig['other_seconds'] / step:>8.1%}")
    print(f"{'step (median)':<18}{step:>10.3f}")
    ok = abs(fig["phases_over_step"] - 1) <= 0.05
    print(f"check: phases add up to {fig['phases_over_step']:.1%} of the step time ({'within' if ok else 'OUTSIDE'} 5%)")
    print()
    rows = [
        ("generated tokens/s", f"{fig['generated_tokens_per_second']:,.0f}"),
        ("trained tokens/s", f"{fig['trained_tokens_per_second']:,.0f}"),
        ("samples/s", f"{fig['samples_per_second']:,.2f}"),
        ("achieved TFLOP/s", f"{fig['achieved_tflops']:.4f}"),
        ("peak TFLOP/s (all ranks)", f"{result['peak_flops'] / 1e12:.4f}"),
        ("MFU", f"{fig['mfu']:.1%}"),
        ("peak memory per rank (MiB)", " ".join(f"{m:,.0f}" for m in result["peak_memory_mib_per_rank"])),
    ]
    for label, value in rows:
        print(f"{label:<28}{value}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    result = launch(args)
    result["summary"] = summarize(result)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
