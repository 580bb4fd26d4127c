#!/usr/bin/env python
"""GRPO iteration throughput: megarlhf vs Hugging Face TRL's GRPOTrainer on this machine.

    python tools/bench/grpo_vs_trl.py                                  # 10 iterations per side, first 2 skipped
    python tools/bench/grpo_vs_trl.py --iterations 4 --warmup 1 --json out.json
    python tools/bench/grpo_vs_trl.py --rounds 3                       # alternate the sides 3 times; show the median round
    python tools/bench/grpo_vs_trl.py --skip-trl --set train.global_batch_size=8

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
     write megarlhf's tokenization of the prompts as id text (tools/bench/trl_common.py's
     placeholder tokenizer encodes it back to the same ids) with the prompt's user text
     for the reward, run tools/bench/trl_grpo.py with --trl-python (a virtualenv with
     TRL 1.16 and sentencepiece, for the reward; it never imports megarlhf) on the same
     settings; its peak RSS is its own ru_maxrss;
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
  - generation: both left-pad the prompts, prefill once and decode response_length steps
    at most (stopping when every row has EOS); megarlhf's decode step is compiled only
    under --set generation.compile=true. TRL samples over the model's 32 logits,
    megarlhf over the tokenizer's 31 pieces.
  - token aggregation: TRL's "dapo" divides by the generation batch's tokens /
    steps_per_generation x gradient_accumulation_steps (the average tokens of an optimizer
    step), megarlhf by the minibatch's own tokens; same work, slightly different weights.
  - TRL computes log-probs with its fused LM head (completion positions only, in tiles);
    megarlhf takes full logits over every position of a microbatch cut to its longest row.
  - optimizers: Megatron's Adam (megarlhf) vs TRL's default AdamW.
On a 2-core machine any other load makes 2-thread figures meaningless (a warning is
printed): run it idle. Even idle, a process's speed can differ from the next one's by up
to 2x on a shared virtual machine (the same work, steady within each process): --rounds
alternates the two sides in fresh processes and shows the round with the median ratio.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl_common import (  # noqa: E402
    SECONDS_ROWS, TOKENS_ROWS, exit_if_unmapped, iteration_parser, measure_both_sides, megarlhf_iterations,
    parse_iteration_args, pct, print_busy_and_versions, print_figures, print_phases, print_rounds, run_megarlhf_iterations,
    run_trl_baseline, summarize_megarlhf, write_json, write_prompts,
)  # fmt: skip
from sft_rm_dpo_vs_trl import export_hf, id_text, prepare_work, train_sft  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GRPO_YAML = "examples/grpo_tiny.yaml"
RULE = "megarlhf.data.synthetic:sort_reward_batch"  # re-implemented in tools/bench/trl_grpo.py


def parse_args(argv=None):
    p = iteration_parser(__doc__, "grpo", "runs, logs, HF export and TRL's JSONL go here")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps when training one (default 40)")
    trl_help = "python of a virtualenv with TRL 1.16 and sentencepiece"
    return parse_iteration_args(p, argv, GRPO_YAML, "/tmp/trlvenv/bin/python", trl_help,
                                "import datasets, sentencepiece, transformers, trl")  # fmt: skip


def grpo_config(args, work: Path, data_dir: Path, tokenizer: Path, sft: Path):
    """The GRPOConfig both sides run, and its command-line overrides."""
    from megarlhf.config import GRPOConfig, load_config

    overrides = [
        f"data.tokenizer={tokenizer}", f"data.train_file={data_dir / 'prompts_train.jsonl'}", "data.eval_file=",
        f"sft_model_path={sft}", "reward_model_path=", f"reward_fn={RULE}",
        f"train.run_dir={work / 'megarlhf_grpo'}", f"train.max_steps={args.iterations}", "train.eval_steps=0",
        "train.save_steps=0",
        # TRL measures no engine/trainer log-prob gap: same work on both sides (--set turns it back on)
        "rollout_correction.measure=false", *args.overrides,
    ]  # fmt: skip
    cfg = load_config(GRPOConfig, REPO / GRPO_YAML, overrides)
    exit_if_unmapped_grpo(cfg, RULE)
    return cfg, overrides


def exit_if_unmapped_grpo(cfg, rule: str) -> None:
    """Exits when `cfg` has GRPO settings TRL's GRPOTrainer cannot mirror (reward: `rule` only)."""
    g, gen = cfg.grpo, cfg.generation
    exit_if_unmapped(cfg, [
        (gen.top_k != 0 or gen.top_p != 1.0, "generation.top_k=0, top_p=1"),
        (cfg.reward_model_path != "" or cfg.reward_fn != rule, f"reward_fn={rule} and no reward model"),
        (g.advantage_estimator not in ("grpo", "dr_grpo"), "grpo.advantage_estimator grpo or dr_grpo"),
        (g.beta > 0 and g.kl_estimator != "k3", "grpo.kl_estimator=k3 (TRL's KL term)"),
        (g.filter_groups or g.entropy_coef != 0, "grpo.filter_groups=false, entropy_coef=0"),
    ], "TRL's GRPOTrainer has no equivalent of these settings here")  # fmt: skip


def summarize_grpo(rows: list[dict], warmup: int, sequences: int) -> dict:
    """megarlhf's figures (bench_common.summarize_megarlhf) plus sequences/s, optimizer
    steps per iteration and the mean rule score of all iterations."""
    per = megarlhf_iterations(rows, {"optimizer_steps": "actor/steps", "rule_score": "objective/rule_score"})
    out = summarize_megarlhf(per, warmup)
    timed = per[warmup:]
    out.update(
        sequences_per_second=sequences * len(timed) / out["seconds"],
        optimizer_steps_per_iteration=sum(r["optimizer_steps"] for r in timed) / len(timed),
        rule_score=statistics.fmean(r["rule_score"] for r in per),
    )
    return out


def run_megarlhf(cfg, overrides: list[str], work: Path, env: dict, warmup: int, yaml: str = GRPO_YAML) -> dict:
    rows, rss = run_megarlhf_iterations("grpo", yaml, cfg, overrides, work, env)
    out = summarize_grpo(rows, warmup, cfg.rollout_rows)
    out.update(peak_rss_mib=rss, parameters={"policy": cfg.model.num_parameters("lm")})
    return out


def trl_prompt_row(item: dict) -> dict:
    """A prompt as TRL's row: megarlhf's tokenization as id text, with the user's text the
    rule reward reads."""
    return {"prompt": id_text(item["prompt_ids"]), "prompt_text": item["prompt_text"]}


def run_trl(cfg, sft: Path, args, work: Path, env: dict) -> dict:
    from megarlhf.data import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    policy = work / "hf" / "sft"
    export_hf(sft, policy, tok.pad_id, work / "export_sft.log", env)
    prompts = work / "trl_prompts.jsonl"
    rows = write_prompts(cfg, prompts, trl_prompt_row)
    cmd = trl_command(cfg, args, policy, prompts, tok.pad_id, tok.eos_id, ["--sp-model", cfg.data.tokenizer])
    r = run_trl_baseline(cmd, work / "trl_grpo.log", env)
    r.update(prompts=rows, sequences_per_second=cfg.rollout_rows * r["timed_iterations"] / r["seconds"])
    return r


def trl_command(cfg, args, policy: Path, prompts: Path, pad_id: int, eos_id: int, task: list) -> list:
    """tools/bench/trl_grpo.py's command line for `cfg`'s GRPO settings; `task` names the
    reward and how to decode completions for it."""
    g, gen, train, optim = cfg.grpo, cfg.generation, cfg.train, cfg.optim
    return [
        args.trl_python, str(REPO / "tools" / "bench" / "trl_grpo.py"),
        "--policy", policy, "--prompts", prompts, *task,
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
        "--pad-id", pad_id, "--eos-id", eos_id, "--vocab", cfg.model.padded_vocab_size,
        "--threads", args.threads, "--seed", train.seed,
    ]  # fmt: skip


def print_table(ours: dict, trl: dict | None, cfg, args) -> None:
    rows = [
        *SECONDS_ROWS, ("sequences/s", "sequences_per_second", "{:.1f}"), *TOKENS_ROWS,
        ("mean rule score (all iterations)", "rule_score", "{:.3f}"),
    ]  # fmt: skip
    print_figures(rows, ours, trl)
    score_note = ""
    if trl:  # the figure: iterations per second, the inverse ratio of seconds per iteration
        speedup = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
        print(f"{'iteration throughput (1/seconds)':<34}{'':>20}{speedup:>13.2f}x")
        reward = pct(trl["phase_seconds"]["reward"], trl["seconds_per_iteration"])
        score_note = f" (score holds the reward, {reward}, and the advantages)"
    print_phases(ours, trl, score_note)
    t, g = cfg.train, cfg.grpo
    print(
        f"\n{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; {t.global_batch_size} prompts x "
        f"{g.num_generations} responses = {cfg.rollout_rows} sequences/iteration, micro-batch {t.micro_batch_size}, "
        f"{g.num_iterations} pass(es) x {g.num_mini_batches} minibatches of {cfg.mini_batch_size}; response_length "
        f"{cfg.generation.response_length}, temperature {cfg.generation.temperature}, beta {g.beta}, epsilon "
        f"{g.epsilon}, {g.loss_aggregation} aggregation; {args.iterations} iterations per side, first "
        f"{args.warmup} skipped; {args.threads} threads; float32 CPU"
    )
    print_busy_and_versions(ours, trl)
    print_rounds(ours, trl)


def main(argv=None) -> int:
    args = parse_args(argv)
    work, data_dir, tokenizer, env = prepare_work(args)
    sft = train_sft(Path(args.sft).resolve() if args.sft else work / "sft", args.sft_steps, data_dir, tokenizer,
                    work / "train_sft.log", env)  # fmt: skip
    cfg, overrides = grpo_config(args, work, data_dir, tokenizer, sft)

    ours, trl = measure_both_sides(
        "grpo", args, lambda: run_megarlhf(cfg, overrides, work, env, args.warmup),
        lambda: run_trl(cfg, sft, args, work, env),
    )  # fmt: skip
    print_table(ours, trl, cfg, args)
    if args.json:
        ratio = None
        if trl:
            ratio = {k: ours[k] / trl[k] for k in (
                "median_tokens_per_second", "total_tokens_per_second", "sequences_per_second")}  # fmt: skip
            ratio["iteration_throughput"] = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
        write_json(args, overrides, ours, trl, ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
