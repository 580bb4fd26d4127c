#!/usr/bin/env python
"""GRPO iteration throughput: megarlhf vs Hugging Face TRL's GRPOTrainer on this machine.

    python tools/bench_grpo.py                                  # 10 iterations per side, first 2 skipped
    python tools/bench_grpo.py --iterations 4 --warmup 1 --json out.json
    python tools/bench_grpo.py --skip-trl --set train.global_batch_size=8

Same policy, prompts, reward and GRPO settings on both sides: the tiny Llama of
examples/grpo_tiny.yaml (the policy of examples/sft_tiny.yaml), the synthetic sorting
task and its rule reward, one process, float32, --threads threads. Steps:
  1. build the task's data and sentencepiece tokenizer in <data-dir> (kept when present);
  2. train a short SFT policy (--sft-steps) with examples/sft_tiny.yaml, unless --sft
     names a run (kept in <work-dir> when present);
  3. run `python -m megarlhf grpo --config examples/grpo_tiny.yaml` for --iterations with
     the rule reward megarlhf.data.synthetic:sort_reward_batch, no evaluation, a
     checkpoint only after the last iteration; read each iteration's figures from its
     metrics.jsonl; peak RSS = ru_maxrss of that child from os.wait4;
  4. export the SFT policy to a Hugging Face folder (tools/convert_megatron_to_hf.py),
     write megarlhf's tokenization of the prompts as id text (tools/trl_baseline.py's
     placeholder tokenizer encodes it back to the same ids) with the prompt's user text
     for the reward, run tools/trl_grpo_baseline.py with --trl-python (a virtualenv with
     TRL 1.16; it never imports megarlhf) on the same settings; its peak RSS is its own
     ru_maxrss;
  5. print a table and write --json if asked.

Definitions (megarlhf's metrics.jsonl, reproduced by the TRL side):
  one iteration    = generate num_generations responses for each of global_batch_size
                     prompts, score them, then num_iterations x num_mini_batches
                     optimizer steps;
  generated tokens = response tokens up to and including EOS (megarlhf's response mask);
  trained tokens   = non-pad prompt + response tokens x grpo.num_iterations;
  tokens/s         = (generated + trained) / iteration seconds
                     (megarlhf's `throughput/tokens_per_second`); sequences/s = sequences
                     generated per iteration / iteration seconds.
Reported: mean and median seconds per iteration, the median of per-iteration token rates
and total tokens / total time of the timed iterations (the first --warmup of each side
are skipped). megarlhf's clock is its `time/iteration` (sampling the prompts .. refit);
TRL's runs from one iteration's last on_step_end to the next, so it also holds TRL's
per-step metric gathering; megarlhf's clock including its loop (the gaps between
metrics.jsonl rows) is shown too.

Settings mapped onto TRL's GRPOConfig (one process):
  per_device_train_batch_size = train.micro_batch_size
  steps_per_generation        = global_batch_size x num_generations / micro_batch_size
      -> generation batch = the iteration's rows, generated in one `generate` call as
         megarlhf's engine does
  gradient_accumulation_steps = (rows / grpo.num_mini_batches) / micro_batch_size
      -> an optimizer step trains on one minibatch, num_mini_batches per pass
  num_generations, num_iterations, epsilon, epsilon_high (0 -> epsilon), beta,
  mask_truncated_completions = grpo.* (same names); max_completion_length =
  generation.response_length; temperature; top_k = 0, top_p = 1
  loss_type: grpo.loss_aggregation token -> "dapo" (token sum over the optimizer step's
      batch / its tokens), sequence -> "grpo" (mean of per-sequence token means)
  scale_rewards: grpo.advantage_estimator grpo -> "group", dr_grpo -> "none"
  use_bias_correction_kl = False (megarlhf's KL term is plain k3); reward_weights =
  [reward_fn_weight]; grpo.missing_eos_penalty is subtracted inside TRL's reward
  function; learning_rate, schedule, warm-up, weight_decay, max_grad_norm = optim.*;
  max_steps = iterations x num_iterations x num_mini_batches; activation checkpointing,
  bf16 and vLLM off. Both sides compute sampling-time log-probs with an extra forward pass
  unless the iteration is one step on one pass (TRL: unless steps_per_generation <=
  gradient_accumulation_steps), and reference log-probs when beta > 0.

Differences left in (each side's own behaviour):
  - sampling order and random streams: each side draws its own prompts and samples its
    own responses, so response lengths, hence tokens per iteration, differ; tokens/s
    divides that out, seconds/iteration does not. Rewards and KL drift apart over
    iterations for the same reason.
  - generation: HF generate left-pads the prompts and decodes response_length steps at
    most (stopping when every row has EOS); megarlhf's engine right-pads, prefills to the
    shortest prompt and steps one position at a time (longer prompts are fed their own
    tokens), so it takes up to (longest - shortest prompt) more decode steps. TRL samples
    over the model's 32 logits, megarlhf over the tokenizer's 31 pieces.
  - token aggregation: TRL's "dapo" divides by the generation batch's tokens /
    steps_per_generation x gradient_accumulation_steps (the average tokens of an optimizer
    step), megarlhf by the minibatch's own tokens; same work, slightly different weights.
  - TRL computes log-probs with its fused LM head (completion positions only, in tiles);
    megarlhf takes full logits over every position of a microbatch cut to its longest row.
  - optimizers: Megatron's Adam (megarlhf) vs TRL's default AdamW.
On a 2-core machine any other load makes 2-thread figures meaningless (a warning is
printed): run it idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ppo import pct, print_figures, read_metrics, run_measured  # noqa: E402
from bench_vs_trl import check_idle, export_hf, id_text, prepare_data, train_sft  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GRPO_YAML = "examples/grpo_tiny.yaml"
RULE = "megarlhf.data.synthetic:sort_reward_batch"  # re-implemented in tools/trl_grpo_baseline.py
PHASES = ("generate", "score", "advantages", "train", "refit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10, help="GRPO iterations per side (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the figures (default 2)")
    p.add_argument("--work-dir", default="runs/bench_grpo", help="runs, logs, HF export and TRL's JSONL go here")
    p.add_argument("--data-dir", default=None, help="task data + sp.model; default <work-dir>/data, built if missing")
    p.add_argument("--sft", default=None, help="megarlhf SFT run to start from (default: <work-dir>/sft, trained if missing)")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps when training one (default 40)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further override of examples/grpo_tiny.yaml (repeatable); the TRL side follows "
                        "the mapped fields")
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="python of a virtualenv with TRL 1.16")
    p.add_argument("--skip-trl", action="store_true", help="run only megarlhf")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (OMP_NUM_THREADS)")
    p.add_argument("--json", default=None, help="also write settings and figures to this file")
    args = p.parse_args(argv)  # fmt: skip
    if args.iterations <= args.warmup:
        p.error(f"--iterations {args.iterations} must exceed --warmup {args.warmup}")
    return args


def grpo_config(args, work: Path, data_dir: Path, tokenizer: Path, sft: Path):
    """The GRPOConfig both sides run, and its command-line overrides."""
    from megarlhf.config import GRPOConfig, load_config

    overrides = [
        f"data.tokenizer={tokenizer}", f"data.train_file={data_dir / 'prompts_train.jsonl'}", "data.eval_file=",
        f"sft_model_path={sft}", "reward_model_path=", f"reward_fn={RULE}",
        f"train.run_dir={work / 'megarlhf_grpo'}", f"train.max_steps={args.iterations}", "train.eval_steps=0",
        "train.save_steps=0", *args.overrides,
    ]  # fmt: skip
    cfg = load_config(GRPOConfig, REPO / GRPO_YAML, overrides)
    g, gen = cfg.grpo, cfg.generation
    unmapped = [
        (cfg.model.arch != "llama" or cfg.model.add_qkv_bias, "model.arch=llama without q/k/v bias"),
        (cfg.layout.tp * cfg.layout.pp != 1 or cfg.model.recompute != "none", "layout.tp=pp=1, model.recompute=none"),
        (gen.top_k != 0 or gen.top_p != 1.0, "generation.top_k=0, top_p=1"),
        (cfg.reward_model_path != "" or cfg.reward_fn != RULE, f"reward_fn={RULE} and no reward model"),
        (g.advantage_estimator not in ("grpo", "dr_grpo"), "grpo.advantage_estimator grpo or dr_grpo"),
        (g.beta > 0 and g.kl_estimator != "k3", "grpo.kl_estimator=k3 (TRL's KL term)"),
        (g.filter_groups or g.entropy_coef != 0, "grpo.filter_groups=false, entropy_coef=0"),
    ]  # fmt: skip
    bad = [need for wrong, need in unmapped if wrong]
    if bad:
        sys.exit("error: TRL's GRPOTrainer has no equivalent of these settings here; need " + "; ".join(bad))
    return cfg, overrides


def summarize_megarlhf(rows: list[dict], warmup: int, sequences: int) -> dict:
    per = [
        {"seconds": r["time/iteration"], "generated": r["tokens/generated"], "trained": r["tokens/trained"],
         "tokens": r["tokens/generated"] + r["tokens/trained"], "response_length": r["response_length"],
         "optimizer_steps": r["actor/steps"], "rule_score": r["objective/rule_score"],
         "loop_seconds": r["time"] - prev["time"] if prev else None,
         **{p: r.get(f"time/{p}", 0.0) for p in PHASES}}
        for prev, r in zip([None, *rows[:-1]], rows)
    ]  # fmt: skip
    timed = per[warmup:]
    n, tokens, seconds = len(timed), sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    loop = [r["loop_seconds"] for r in timed if r["loop_seconds"] is not None]
    return {
        "iterations": len(per), "timed_iterations": n, "tokens": tokens, "seconds": seconds,
        "seconds_per_iteration": seconds / n,
        "median_seconds_per_iteration": statistics.median(r["seconds"] for r in timed),
        "loop_seconds_per_iteration": sum(loop) / len(loop) if loop else None,
        "sequences_per_second": sequences * n / seconds,
        "generated_per_iteration": sum(r["generated"] for r in timed) / n,
        "trained_per_iteration": sum(r["trained"] for r in timed) / n,
        "median_tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in timed),
        "total_tokens_per_second": tokens / seconds,
        "phase_seconds": {p: sum(r[p] for r in timed) / n for p in PHASES},
        "optimizer_steps_per_iteration": sum(r["optimizer_steps"] for r in timed) / n,
        "rule_score": statistics.fmean(r["rule_score"] for r in per),
        "per_iteration": per,
    }  # fmt: skip


def run_megarlhf(cfg, overrides: list[str], work: Path, env: dict, warmup: int) -> dict:
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists():  # a fresh run: no resume, metrics.jsonl from this run only
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "megarlhf", "grpo", "--config", GRPO_YAML, *overrides]
    rss = run_measured(cmd, work / "megarlhf_grpo.log", env)
    out = summarize_megarlhf(read_metrics(run_dir), warmup, cfg.rollout_rows)
    out.update(peak_rss_mib=rss, parameters={"policy": cfg.model.num_parameters("lm")})
    return out


def write_prompts(cfg, out: Path) -> int:
    """megarlhf's tokenization of the prompts (its chat template) as id text, with the
    user's text the rule reward reads."""
    from megarlhf.data import ChatTemplate, PromptDataset, load_tokenizer

    d = cfg.data
    data = PromptDataset(d.train_file, load_tokenizer(d.tokenizer), ChatTemplate(), d.max_length,
                         truncation=d.truncation, on_error=d.on_error)  # fmt: skip
    with open(out, "w", encoding="utf-8") as f:
        for it in data:
            f.write(json.dumps({"prompt": id_text(it["prompt_ids"]), "prompt_text": it["prompt_text"]}) + "\n")
    return len(data)


def run_trl(cfg, sft: Path, args, work: Path, env: dict) -> dict:
    from megarlhf.data import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    policy = work / "hf" / "sft"
    export_hf(sft, policy, tok.pad_id, work / "export_sft.log", env)
    prompts = work / "trl_prompts.jsonl"
    rows = write_prompts(cfg, prompts)
    g, gen, train, optim = cfg.grpo, cfg.generation, cfg.train, cfg.optim
    cmd = [
        args.trl_python, str(REPO / "tools" / "trl_grpo_baseline.py"),
        "--policy", policy, "--prompts", prompts, "--sp-model", cfg.data.tokenizer,
        "--iterations", args.iterations, "--warmup", args.warmup,
        "--prompts-per-iteration", train.global_batch_size, "--num-generations", g.num_generations,
        "--micro-batch-size", train.micro_batch_size, "--num-mini-batches", g.num_mini_batches,
        "--num-iterations", g.num_iterations, "--response-length", gen.response_length,
        "--temperature", gen.temperature, "--beta", g.beta, "--epsilon", g.epsilon,
        *(["--epsilon-high", g.epsilon_high] if g.epsilon_high else []),
        "--loss-type", {"token": "dapo", "sequence": "grpo"}[g.loss_aggregation],
        "--scale-rewards", {"grpo": "group", "dr_grpo": "none"}[g.advantage_estimator],
        *(["--mask-truncated-completions"] if g.mask_truncated_completions else []),
        "--missing-eos-penalty", g.missing_eos_penalty, "--reward-weight", cfg.reward_fn_weight,
        "--lr", optim.learning_rate, "--lr-scheduler", optim.lr_scheduler_type,
        "--warmup-lr-steps", optim.warmup_steps, "--weight-decay", optim.weight_decay,
        "--max-grad-norm", optim.max_grad_norm,
        "--pad-id", tok.pad_id, "--eos-id", tok.eos_id, "--vocab", cfg.model.padded_vocab_size,
        "--threads", args.threads, "--seed", train.seed,
    ]  # fmt: skip
    log = work / "trl_grpo.log"
    rss = run_measured([str(c) for c in cmd], log, env)
    r = json.loads(log.read_text().strip().splitlines()[-1])
    r.update(peak_rss_mib_wait4=rss, prompts=rows,
             sequences_per_second=cfg.rollout_rows * r["timed_iterations"] / r["seconds"])  # fmt: skip
    return r


def print_table(ours: dict, trl: dict | None, cfg, args) -> None:
    rows = [
        ("seconds / iteration (mean)", "seconds_per_iteration", "{:.2f}"),
        ("seconds / iteration (median)", "median_seconds_per_iteration", "{:.2f}"),
        ("sequences/s", "sequences_per_second", "{:.1f}"),
        ("generated tokens / iteration", "generated_per_iteration", "{:.0f}"),
        ("trained tokens / iteration", "trained_per_iteration", "{:.0f}"),
        ("tokens/s (median of iterations)", "median_tokens_per_second", "{:.0f}"),
        ("tokens/s (total / time)", "total_tokens_per_second", "{:.0f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("optimizer steps / iteration", "optimizer_steps_per_iteration", "{:.0f}"),
        ("mean rule score (all iterations)", "rule_score", "{:.3f}"),
    ]
    print_figures(rows, ours, trl)
    if trl:  # the figure: iterations per second, the inverse ratio of seconds per iteration
        speedup = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
        print(f"{'iteration throughput (1/seconds)':<34}{'':>20}{speedup:>13.2f}x")
    ph, it = ours["phase_seconds"], ours["seconds_per_iteration"]
    print("\nmegarlhf per phase (% of time/iteration): " + ", ".join(f"{p} {pct(ph[p], it)}" for p in PHASES)
          + f"; seconds/iteration incl. the loop: {ours['loop_seconds_per_iteration'] or float('nan'):.2f}")  # fmt: skip
    print(f"megarlhf generation: {ours['generated_per_iteration'] / ph['generate']:.0f} generated tokens/s")
    if trl:
        tp, tit = trl["phase_seconds"], trl["seconds_per_iteration"]
        print("TRL per phase (% of iteration): " + ", ".join(f"{p} {pct(tp[p], tit)}" for p in ("generate", "score", "train"))
              + f" (score holds the reward, {pct(tp['reward'], tit)}, and the advantages)")  # fmt: skip
        print(f"TRL generation: {trl['generated_per_iteration'] / tp['generate']:.0f} generated tokens/s; "
              f"parameters policy {trl['parameters']['policy']:,} (megarlhf {ours['parameters']['policy']:,})")  # fmt: skip
    t, g = cfg.train, cfg.grpo
    print(
        f"\n{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; {t.global_batch_size} prompts x "
        f"{g.num_generations} responses = {cfg.rollout_rows} sequences/iteration, micro-batch {t.micro_batch_size}, "
        f"{g.num_iterations} pass(es) x {g.num_mini_batches} minibatches of {cfg.mini_batch_size}; response_length "
        f"{cfg.generation.response_length}, temperature {cfg.generation.temperature}, beta {g.beta}, epsilon "
        f"{g.epsilon}, {g.loss_aggregation} aggregation; {args.iterations} iterations per side, first "
        f"{args.warmup} skipped; {args.threads} threads; float32 CPU"
    )
    busy = f"cores busy with other work just before the runs: megarlhf {ours['busy_cores']:.1f}"
    if trl:
        v = trl["versions"]
        busy += f", TRL {trl['busy_cores']:.1f}; TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']}"
    print(busy)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "data"
    tokenizer = prepare_data(data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    sft = train_sft(Path(args.sft).resolve() if args.sft else work / "sft", args.sft_steps, data_dir, tokenizer,
                    work / "train_sft.log", env)  # fmt: skip
    cfg, overrides = grpo_config(args, work, data_dir, tokenizer, sft)

    print(f"[grpo] megarlhf: {args.iterations} iterations ...", flush=True)
    busy = check_idle(args.threads, "megarlhf grpo")
    ours = run_megarlhf(cfg, overrides, work, env, args.warmup)
    ours["busy_cores"] = busy
    trl = None
    if not args.skip_trl:
        print(f"[grpo] TRL: {args.iterations} iterations ...", flush=True)
        busy = check_idle(args.threads, "TRL grpo")
        trl = run_trl(cfg, sft, args, work, env)
        trl["busy_cores"] = busy
    print_table(ours, trl, cfg, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        result = {"settings": settings, "megarlhf_overrides": overrides, "megarlhf": ours, "trl": trl}
        if trl:
            result["ratio"] = {k: ours[k] / trl[k] for k in (
                "median_tokens_per_second", "total_tokens_per_second", "sequences_per_second")}  # fmt: skip
            result["ratio"]["iteration_throughput"] = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
