#!/usr/bin/env python
"""PPO iteration throughput of Hugging Face TRL's PPOTrainer (TRL 1.12) on a tiny Llama.

The baseline half of tools/bench/ppo_vs_trl.py; runs in a virtualenv with TRL 1.12.0 (the last
release with `trl.experimental.ppo.PPOTrainer`) and never imports megarlhf or Megatron.
Models are Hugging Face folders exported from megarlhf checkpoints: policy and reference
from the SFT policy (LlamaForCausalLM), reward and value model from the reward model
(LlamaForSequenceClassification, num_labels=1). Prompts are pre-tokenized JSONL rows
{"input_ids": [...]} written by ppo_vs_trl.py with megarlhf's chat template, so both
frameworks start from the same token ids.

    /tmp/trlppo/bin/python tools/bench/trl_ppo.py --policy sft-hf --reward rm-hf \\
        --prompts prompts.jsonl --iterations 10 --warmup 2

One iteration is one "update" of PPOTrainer.train(): draw `batch_size` prompts, generate,
score (reference log-probs, values, reward), shape + GAE + whitening, num_ppo_epochs
passes of clipped policy + value losses. Measured without changing what TRL does:
  - iteration wall time: previous on_step_end -> this on_step_end (a TrainerCallback;
    the first iteration starts at on_train_begin). TRL fires on_step_end once per update.
  - generate: the module-level `batch_generation` of trl.experimental.ppo.ppo_trainer,
    wrapped with a clock; it also sees each batch's queries and responses, from which:
  - tokens/generated = response tokens up to and including the first EOS (all
    response_length of them when there is none): megarlhf's response mask.
  - tokens/trained = (non-pad prompt tokens + generated) x num_ppo_epochs: megarlhf's
    `tokens/trained`; tokens/s = (generated + trained) / iteration seconds, as megarlhf's
    `throughput/tokens_per_second`.
  - train: from the first gradient-enabled call of the module-level `forward` (the PPO
    epochs' first microbatch) to on_step_end; score = the rest (reference, value and
    reward forwards, shaping, GAE, whitening).
  - optimizer steps: a step post-hook on the inner torch optimizer.
  - peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (KiB on Linux).
The first --warmup iterations are left out of the figures. The last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_common import add_iteration_args, build_tokenizer, iteration_result, parse_iteration_args, read_jsonl  # noqa: E402
from trl_common import count_optimizer_steps, iteration_callback, summarize_iterations, use_threads  # noqa: E402

PHASES = ("generate", "score", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="HF LlamaForCausalLM folder: policy and reference")
    p.add_argument("--reward", required=True, help="HF LlamaForSequenceClassification folder (num_labels=1)")
    p.add_argument("--value", default=None, help="HF folder of the value model (default: --reward)")
    p.add_argument("--prompts", required=True, help='pre-tokenized prompts, JSONL {"input_ids": [...]}')
    add_iteration_args(p, "PPO iterations (TRL updates) to run")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per iteration (megarlhf's global_batch_size)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="sequences per training forward/backward")
    p.add_argument("--rollout-batch-size", type=int, default=64,
                   help="local_rollout_forward_batch_size: rows per generate call and per scoring forward")
    p.add_argument("--num-mini-batches", type=int, default=1)
    p.add_argument("--num-ppo-epochs", type=int, default=2)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange-value", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--whiten-rewards", action="store_true")
    p.add_argument("--missing-eos-penalty", type=float, default=None)
    p.add_argument("--lr", type=float, default=1e-4, help="one AdamW over policy and value model, constant")
    p.add_argument("--weight-decay", type=float, default=0.0)
    args = parse_iteration_args(p, argv)  # fmt: skip
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    return args


def load_models(args):
    """(policy, reference, reward, value) in float32, SDPA attention, on CPU."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy = LlamaForCausalLM.from_pretrained(args.policy, **kw)
    reference = LlamaForCausalLM.from_pretrained(args.policy, **kw)
    heads = []
    for path in (args.reward, args.value or args.reward):
        model = LlamaForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
        heads.append(model)
    return policy, reference, heads[0], heads[1]


class Meter:
    """Per-iteration clocks and token counts, fed by wrappers around TRL's module-level
    `batch_generation` and `forward` and by a TrainerCallback."""

    def __init__(self, eos_id: int, pad_id: int, epochs: int):
        self.eos_id, self.pad_id, self.epochs = eos_id, pad_id, epochs
        self.rows: list[dict] = []
        self.optimizer_steps = 0
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        """Start a new iteration's clock and counts at `now`."""
        self.start, self.train_start = now, None
        self.generate_seconds = 0.0
        self.generated = self.prompt_tokens = self.positions = 0
        self.steps_before = self.optimizer_steps

    def wrap_generation(self, fn):
        import torch

        def timed(model, queries, *a, **kw):
            t0 = time.perf_counter()
            query_responses, logits = fn(model, queries, *a, **kw)
            self.generate_seconds += time.perf_counter() - t0
            responses = query_responses[:, queries.shape[1] :]  # [B, R], R <= response_length
            # Length up to and including the first EOS; every column when there is none.
            is_eos = responses == self.eos_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])
            self.generated += int(first.sum())
            self.prompt_tokens += int((queries != self.pad_id).sum())
            self.positions += query_responses.numel()
            return query_responses, logits

        return timed

    def wrap_forward(self, fn):
        import torch

        def timed(*a, **kw):
            if self.train_start is None and torch.is_grad_enabled():
                self.train_start = time.perf_counter()
            return fn(*a, **kw)

        return timed

    def step_end(self) -> None:
        """Called at every on_step_end, once per PPO update in TRL 1.12: closes the iteration's row."""
        end = time.perf_counter()
        seconds = end - self.start
        train = end - self.train_start if self.train_start is not None else 0.0
        trained = (self.prompt_tokens + self.generated) * self.epochs
        self.rows.append({
            "seconds": seconds, "generate": self.generate_seconds, "train": train,
            "score": seconds - self.generate_seconds - train,
            "generated": self.generated, "trained": trained, "tokens": self.generated + trained,
            "positions": self.positions, "optimizer_steps": self.optimizer_steps - self.steps_before,
        })  # fmt: skip
        self.reset(end)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_threads(args.threads, args.seed)
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    dataset = Dataset.from_list([{"input_ids": row["input_ids"]} for row in read_jsonl(args.prompts)])
    # Left padding: TRL appends responses after the (left-padded) queries. It never
    # tokenizes the pre-tokenized rows, so only the pad and EOS pieces matter here.
    tokenizer = build_tokenizer(args.vocab, args.pad_id, args.eos_id, padding_side="left")
    policy, reference, reward, value = load_models(args)

    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_ppo_baseline_"),
        # batch_size = per_device_train_batch_size x gradient_accumulation_steps (x 1 process):
        # the prompts of one iteration; TRL cuts it into num_mini_batches minibatches of
        # micro-batches of per_device_train_batch_size rows.
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.num_ppo_epochs,
        total_episodes=args.iterations * args.batch_size,  # -> num_total_batches = iterations
        local_rollout_forward_batch_size=args.rollout_batch_size,
        response_length=args.response_length, temperature=args.temperature, stop_token="eos",
        missing_eos_penalty=args.missing_eos_penalty,
        kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, whiten_rewards=args.whiten_rewards,
        cliprange=args.cliprange, cliprange_value=args.cliprange_value, vf_coef=args.vf_coef,
        gamma=args.gamma, lam=args.lam,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=args.weight_decay,
        # TRL's PPOConfig turns on activation checkpointing and bf16 by default; megarlhf's
        # tiny configs recompute nothing and train in float32.
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        num_sample_generations=0, eval_strategy="no", save_strategy="no", report_to=[],
        logging_steps=args.iterations + 1, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
    )  # fmt: skip
    meter = Meter(args.eos_id, args.pad_id, args.num_ppo_epochs)
    # Measurement only: the loop calls these module-level functions by name.
    ppo_module.batch_generation = meter.wrap_generation(ppo_module.batch_generation)
    ppo_module.forward = meter.wrap_forward(ppo_module.forward)
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
        value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(1)),
    )  # fmt: skip
    if policy.is_gradient_checkpointing:
        raise SystemExit("error: activation checkpointing is on; the comparison assumes no recompute")
    if args.iterations >= len(dataset) // args.batch_size:
        # accelerate syncs gradients on every microbatch of a dataloader's last batch, so
        # that iteration would take more optimizer steps than the others.
        print(f"note: {args.iterations} iterations reach the end of the {len(dataset)}-prompt dataloader; "
              "its last batch takes one optimizer step per microbatch", file=sys.stderr)  # fmt: skip
    count_optimizer_steps(meter, trainer.optimizer)
    trainer.add_callback(iteration_callback(meter))
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # save_strategy="no": nothing worth keeping

    config_keys = (
        "batch_size", "mini_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
        "num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length",
        "temperature", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
        "whiten_rewards", "missing_eos_penalty", "learning_rate", "stop_token",
    )  # fmt: skip
    parameters = {name: sum(p.numel() for p in m.parameters()) for name, m in (("policy", policy), ("value", value))}
    figures = summarize_iterations(meter.rows, args.warmup, PHASES)
    result = iteration_result(args, meter.rows, parameters, config, config_keys, figures)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
