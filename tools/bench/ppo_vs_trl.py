#!/usr/bin/env python
"""PPO iteration throughput: megarlhf vs Hugging Face TRL's PPOTrainer on this machine.

    python tools/bench/ppo_vs_trl.py                                   # 10 iterations per side, first 2 skipped
    python tools/bench/ppo_vs_trl.py --iterations 4 --warmup 1 --json out.json
    python tools/bench/ppo_vs_trl.py --rounds 3                        # alternate the sides 3 times; show the median round
    python tools/bench/ppo_vs_trl.py --skip-trl --set train.global_batch_size=32

Same models, prompts and PPO settings on both sides: the tiny Llama of
examples/ppo_tiny.yaml (the policy of examples/sft_tiny.yaml, the reward model of
examples/rm_tiny.yaml), the synthetic sorting task, one process, float32, --threads
threads. Steps:
  1. build the task's data and sentencepiece tokenizer in <data-dir> (kept when present);
  2. train a short SFT policy (--sft-steps) and a reward model from it (--rm-steps) with
     the example configs, unless --sft/--rm name runs (kept in <work-dir> when present);
  3. run `python -m megarlhf ppo --config examples/ppo_tiny.yaml` for --iterations with
     the reward model as the only reward (reward_fn= reward_model_weight=1: TRL's PPO has
     no rule rewards), no evaluation, a checkpoint only after the last iteration; read
     each iteration's figures from its metrics.jsonl; peak RSS = ru_maxrss of that child
     from os.wait4;
  4. export SFT and RM to Hugging Face folders (tools/convert_megatron_to_hf.py), write
     megarlhf's tokenization of the prompts as JSONL, run tools/bench/trl_ppo.py with
     --trl-python (a virtualenv with trl==1.12.0, the last release with PPOTrainer; it
     never imports megarlhf) on the same settings; its peak RSS is its own ru_maxrss
     (the same figure os.wait4 gives, kept in the JSON as peak_rss_mib_wait4);
  5. print a table and write --json if asked.

Definitions (megarlhf's metrics.jsonl, reproduced by the TRL side):
  generated tokens = response tokens up to and including EOS (megarlhf's response mask);
  trained tokens   = non-pad prompt + response tokens x ppo.num_ppo_epochs;
  tokens/s         = (generated + trained) / iteration seconds
                     (megarlhf's `throughput/tokens_per_second`).
Reported: the median of per-iteration rates, and total tokens / total time of the timed
iterations (the first --warmup of each side are skipped). megarlhf's clock is its
`time/iteration` (sampling the prompts .. refit); TRL's runs from one on_step_end to the
next, so it also holds TRL's per-update gc.collect() and metric gathering; megarlhf's
clock including its loop (the gaps between metrics.jsonl rows) is shown too.

Settings mapped onto TRL 1.12's PPOConfig (one process, so batch_size = local_batch_size):
  per_device_train_batch_size = train.micro_batch_size
  gradient_accumulation_steps = train.global_batch_size / micro_batch_size
      -> batch_size = global_batch_size prompts per iteration
  num_mini_batches, num_ppo_epochs, cliprange, cliprange_value, vf_coef, gamma, lam,
  kl_coef, kl_estimator, whiten_rewards, missing_eos_penalty = ppo.* (same names)
  response_length, temperature = generation.*; stop_token = "eos"
  local_rollout_forward_batch_size = global_batch_size: TRL then generates all prompts in
      one batch as megarlhf's engine does (its scoring forwards then take 64 rows at a
      time, megarlhf's train.forward_micro_batch_size rows: 64 in the example too)
  total_episodes = iterations x global_batch_size; learning_rate = optim.learning_rate,
  constant; weight_decay = optim.weight_decay; gradient_checkpointing, bf16 off.
megarlhf is given ppo.adap_kl_ctrl=false (TRL 1.12 has a fixed kl_coef only) and, by
default, ppo.num_mini_batches=1 (--num-mini-batches): TRL steps its optimizer once per
gradient_accumulation_steps microbatches, and batch_size = micro x accumulation, so it
takes exactly one optimizer step per PPO epoch whatever num_mini_batches is (a
minibatch's gradient then accumulates into the next), while megarlhf steps once per
minibatch. At 1 both take one step per epoch per trainable model (the table counts
optimizer steps: megarlhf's actor + critic from its config, TRL's one optimizer by a hook).

Differences left in (each side's own behaviour):
  - sampling order and random streams: each side draws its own prompts (TRL's shuffled
    DataLoader, megarlhf's sampler) and samples its own responses, so response lengths,
    and hence tokens per iteration, differ; tokens/s divides that out, seconds/iteration
    does not. KL and learning dynamics drift apart over iterations for the same reason.
  - generation: both left-pad the prompts, prefill once and decode response_length steps
    at most (stopping when every row has EOS); megarlhf's decode step is compiled only
    under --set generation.compile=true. TRL samples over the model's 32 logits,
    megarlhf over the tokenizer's 31 pieces.
  - rollout log-probs: TRL takes them from generate's scores; megarlhf from its engine
    (generation.old_logprobs=engine, the default), no extra forward pass either side.
  - TRL trains policy and value with one AdamW (optim.learning_rate for both), no
    gradient clipping; megarlhf has an optimizer per role (critic_optim's lr), clips at
    max_grad_norm, and runs actor and critic steps one after the other.
  - TRL scores and trains on every column of its left-padded batch (longest prompt +
    longest response; pads are masked out of attention but still computed); megarlhf
    cuts each microbatch to its own longest row (rows grouped by length).
On a 2-core machine any other load makes 2-thread figures meaningless (a warning is
printed): run it idle. Even idle, a process's speed can differ from the next one's by up
to 2x on a shared virtual machine (the same work, steady within each process): --rounds
alternates the two sides in fresh processes and shows the round with the median ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl_common import (  # noqa: E402
    SECONDS_ROWS, TOKENS_ROWS, exit_if_unmapped, iteration_parser, measure_both_sides, megarlhf_iterations,
    parse_iteration_args, print_busy_and_versions, print_figures, print_phases, print_rounds, run_megarlhf_iterations,
    run_trl_baseline, summarize_megarlhf, write_json, write_prompts,
)  # fmt: skip
from sft_rm_dpo_vs_trl import export_hf, prepare_work, run_logged  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PPO_YAML, SFT_YAML, RM_YAML = "examples/ppo_tiny.yaml", "examples/sft_tiny.yaml", "examples/rm_tiny.yaml"


def parse_args(argv=None):
    p = iteration_parser(__doc__, "ppo", "runs, logs, HF exports and TRL's JSONL go here")
    p.add_argument("--rm", default=None, help="megarlhf reward-model run (default: <work-dir>/rm, trained if missing)")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT steps when training one (default 40)")
    p.add_argument("--rm-steps", type=int, default=100, help="reward-model steps when training one (default 100)")
    p.add_argument("--num-mini-batches", type=int, default=1,
                   help="ppo.num_mini_batches on both sides (default 1: see 'Settings mapped' above)")
    trl_imports = "import datasets, transformers; from trl.experimental.ppo import PPOTrainer"
    trl_help = "python of a virtualenv with trl==1.12.0"
    return parse_iteration_args(p, argv, PPO_YAML, "/tmp/trlppo/bin/python", trl_help, trl_imports)


def train_policy_and_rm(args, work: Path, data_dir: Path, tokenizer: Path, env: dict) -> tuple[Path, Path]:
    """The SFT and reward-model runs PPO starts from: given, kept from an earlier run, or trained."""
    sft = Path(args.sft).resolve() if args.sft else work / "sft"
    rm = Path(args.rm).resolve() if args.rm else work / "rm"
    common = [f"data.tokenizer={tokenizer}", "data.eval_file=", "train.eval_steps=0", "train.save_steps=0"]
    for stage, run, yaml, train_file, steps, extra in (
        ("sft", sft, SFT_YAML, "sft.jsonl", args.sft_steps, []),
        ("rm", rm, RM_YAML, "prefs_train.jsonl", args.rm_steps, [f"init_from={sft}"]),
    ):
        if getattr(args, stage) or (run / "checkpoints" / "latest").is_file():
            print(f"[setup] {stage}: {run}", flush=True)
            continue
        print(f"[setup] training {stage}: {steps} steps -> {run}", flush=True)
        cmd = [sys.executable, "-m", "megarlhf", stage, "--config", yaml, *common, *extra,
               f"data.train_file={data_dir / train_file}", f"train.run_dir={run}", f"train.max_steps={steps}"]  # fmt: skip
        run_logged(cmd, work / f"train_{stage}.log", env)
    return sft, rm


def ppo_config(args, work: Path, data_dir: Path, tokenizer: Path, sft: Path, rm: Path):
    """The PPOConfig both sides run, and its command-line overrides."""
    from megarlhf.config import PPOConfig, load_config

    overrides = [
        f"data.tokenizer={tokenizer}", f"data.train_file={data_dir / 'prompts_train.jsonl'}", "data.eval_file=",
        f"sft_model_path={sft}", f"reward_model_path={rm}", "reward_fn=", "reward_model_weight=1",
        "value_model_path=",
        f"train.run_dir={work / 'megarlhf_ppo'}", f"train.max_steps={args.iterations}", "train.eval_steps=0",
        "train.save_steps=0",
        # TRL measures no engine/trainer log-prob gap: same work on both sides (--set turns it back on)
        "rollout_correction.measure=false", "ppo.adap_kl_ctrl=false", f"ppo.num_mini_batches={args.num_mini_batches}",
        *args.overrides,
    ]  # fmt: skip
    cfg = load_config(PPOConfig, REPO / PPO_YAML, overrides)
    ppo, gen = cfg.ppo, cfg.generation
    exit_if_unmapped(cfg, [
        (gen.top_k != 0 or gen.top_p != 1.0, "generation.top_k=0, top_p=1 (TRL samples the full distribution)"),
        (ppo.adap_kl_ctrl or ppo.kl_estimator == "k2", "ppo.adap_kl_ctrl=false, kl_estimator k1 or k3"),
        (ppo.entropy_coef != 0 or not ppo.whiten_advantages or ppo.normalize_reward or ppo.reward_clip != 0,
         "ppo.entropy_coef=0, whiten_advantages=true, normalize_reward=false, reward_clip=0"),
        (cfg.reward_model_weight != 1.0, "reward_model_weight=1"),
    ], "TRL 1.12's PPOTrainer has no equivalent of these settings")  # fmt: skip
    return cfg, overrides


def run_megarlhf(cfg, overrides: list[str], work: Path, env: dict, warmup: int) -> dict:
    rows, rss = run_megarlhf_iterations("ppo", PPO_YAML, cfg, overrides, work, env)
    out = summarize_megarlhf(megarlhf_iterations(rows), warmup)
    # One optimizer step per minibatch and epoch, for the actor and for the critic.
    out.update(peak_rss_mib=rss, optimizer_steps_per_iteration=2 * cfg.ppo.num_ppo_epochs * cfg.ppo.num_mini_batches,
               parameters={"policy": cfg.model.num_parameters("lm")})  # fmt: skip
    return out


def trl_prompt_row(item: dict) -> dict:
    """A prompt as TRL's row: megarlhf's tokenization (its chat template) as input_ids."""
    return {"input_ids": item["prompt_ids"].tolist()}


def run_trl(cfg, sft: Path, rm: Path, args, work: Path, env: dict) -> dict:
    from megarlhf.data import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    hf = work / "hf"
    export_hf(sft, hf / "sft", tok.pad_id, work / "export_sft.log", env)
    export_hf(rm, hf / "rm", tok.pad_id, work / "export_rm.log", env)
    prompts = work / "trl_prompts.jsonl"
    rows = write_prompts(cfg, prompts, trl_prompt_row)
    ppo, gen, train = cfg.ppo, cfg.generation, cfg.train
    cmd = [
        args.trl_python, str(REPO / "tools" / "bench" / "trl_ppo.py"),
        "--policy", hf / "sft", "--reward", hf / "rm", "--prompts", prompts,
        "--iterations", args.iterations, "--warmup", args.warmup,
        "--batch-size", train.global_batch_size, "--micro-batch-size", train.micro_batch_size,
        "--rollout-batch-size", train.global_batch_size,
        "--num-mini-batches", ppo.num_mini_batches, "--num-ppo-epochs", ppo.num_ppo_epochs,
        "--response-length", gen.response_length, "--temperature", gen.temperature,
        "--kl-coef", ppo.kl_coef, "--kl-estimator", ppo.kl_estimator, "--cliprange", ppo.cliprange,
        "--cliprange-value", ppo.cliprange_value, "--vf-coef", ppo.vf_coef, "--gamma", ppo.gamma, "--lam", ppo.lam,
        *(["--whiten-rewards"] if ppo.whiten_rewards else []),
        *(["--missing-eos-penalty", ppo.missing_eos_penalty] if ppo.missing_eos_penalty else []),
        "--lr", cfg.optim.learning_rate, "--weight-decay", cfg.optim.weight_decay,
        "--pad-id", tok.pad_id, "--eos-id", tok.eos_id, "--vocab", cfg.model.vocab_size,
        "--threads", args.threads, "--seed", train.seed,
    ]  # fmt: skip
    r = run_trl_baseline(cmd, work / "trl_ppo.log", env)
    r["prompts"] = rows
    return r


def print_table(ours: dict, trl: dict | None, cfg, args) -> None:
    print_figures([*SECONDS_ROWS, *TOKENS_ROWS], ours, trl)
    print_phases(ours, trl, " (score holds shaping/GAE/whitening)")
    t, m = cfg.train, cfg.model
    print(
        f"\n{m.num_layers} layers, hidden {m.hidden_size}; {t.global_batch_size} prompts/iteration, micro-batch "
        f"{t.micro_batch_size}, {cfg.ppo.num_ppo_epochs} epochs x {cfg.ppo.num_mini_batches} minibatches, "
        f"response_length {cfg.generation.response_length}, temperature {cfg.generation.temperature}; "
        f"{args.iterations} iterations per side, first {args.warmup} skipped; {args.threads} threads; float32 CPU"
    )
    print_busy_and_versions(ours, trl)
    print_rounds(ours, trl)


def main(argv=None) -> int:
    args = parse_args(argv)
    work, data_dir, tokenizer, env = prepare_work(args)
    sft, rm = train_policy_and_rm(args, work, data_dir, tokenizer, env)
    cfg, overrides = ppo_config(args, work, data_dir, tokenizer, sft, rm)

    ours, trl = measure_both_sides(
        "ppo", args, lambda: run_megarlhf(cfg, overrides, work, env, args.warmup),
        lambda: run_trl(cfg, sft, rm, args, work, env),
    )  # fmt: skip
    print_table(ours, trl, cfg, args)
    if args.json:
        ratio = None
        if trl:
            ratio = {k: ours[k] / trl[k] for k in
                     ("median_tokens_per_second", "total_tokens_per_second", "seconds_per_iteration")}  # fmt: skip
        write_json(args, overrides, ours, trl, ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
