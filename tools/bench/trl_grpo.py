#!/usr/bin/env python
"""GRPO iteration throughput of Hugging Face TRL's GRPOTrainer on a tiny Llama.

The baseline half of tools/bench/grpo_vs_trl.py; runs in a virtualenv with TRL (1.16: GRPOTrainer)
and never imports megarlhf or Megatron. The policy is a Hugging Face folder exported from
megarlhf's SFT run (TRL loads the reference from the same folder). Prompts are JSONL rows
{"prompt": id text, "prompt_text": str} written by grpo_vs_trl.py: "prompt" is megarlhf's
tokenization of the prompt (its chat template) as one `<id{i}>` piece per id, which the
placeholder tokenizer of tools/bench/trl_common.py encodes back to exactly those ids, so both
frameworks generate from the same token ids; "prompt_text" is the user's text the rule
reward reads.

    /tmp/trlvenv/bin/python tools/bench/trl_grpo.py --policy sft-hf --prompts prompts.jsonl \\
        --sp-model data/sp.model --iterations 10 --warmup 2

Reward: the synthetic sorting task's rule (megarlhf.data.synthetic.sort_reward_batch,
re-implemented below: the fraction of positions holding the right digit of the sorted
prompt), on the completion decoded with the task's sentencepiece model (EOS and pad
dropped, as megarlhf's rule_scores does; an id past the tokenizer's pieces, which only
TRL can sample, decodes as the unknown piece), minus --missing-eos-penalty when the
completion has no EOS (megarlhf subtracts grpo.missing_eos_penalty before the advantages
too).

One iteration = one generation batch and its optimizer steps: TRL generates
`steps_per_generation` micro-batches' worth of rows (prompts x num_generations) at once,
then takes num_iterations x num_mini_batches optimizer steps of gradient_accumulation_steps
micro-batches each. Measured without changing what TRL does:
  - iteration wall time: on_step_end of the previous iteration's last optimizer step ->
    on_step_end of this one's (the first starts at on_train_begin);
  - generate: `trainer._generate` (prompt tokenization, transformers' generate, decoding),
    wrapped with a clock; it also returns the prompt and completion ids, from which:
  - tokens/generated = completion tokens up to and including the first EOS (TRL's
    completion mask = megarlhf's response mask);
  - tokens/trained = (prompt tokens + generated) x num_iterations (megarlhf's
    `tokens/trained`); tokens/s = (generated + trained) / iteration seconds, as megarlhf's
    `throughput/tokens_per_second`;
  - score: the rest of `trainer._generate_and_score_completions` (sampling-time and
    reference log-probs, the reward, advantages); its `_calculate_rewards` is also timed;
  - train: the rest of the iteration (the optimizer steps);
  - optimizer steps: a step post-hook on the inner torch optimizer;
  - rule_score: the mean rule score of all iterations' responses, before the penalty
    (megarlhf's `objective/rule_score`): a check that both sides score alike;
  - peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (KiB on Linux).
The first --warmup iterations are left out of the figures. The last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_common import add_iteration_args, build_tokenizer, iteration_result, load_policy, parse_iteration_args, read_jsonl  # noqa: E402
from trl_common import count_optimizer_steps, iteration_callback, summarize_iterations, use_threads  # noqa: E402

PHASES = ("generate", "score", "reward", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="HF LlamaForCausalLM folder: policy and reference")
    p.add_argument("--prompts", required=True, help='JSONL {"prompt": id text, "prompt_text": str}')
    p.add_argument("--sp-model", default=None, help="--reward sort: the task's sentencepiece model, to decode completions")
    p.add_argument("--reward", choices=["sort", "gsm8k"], default="sort",
                   help="sort: the synthetic sorting rule; gsm8k: megarlhf/rollout/math_rewards.py's strict rule "
                        "against the prompts' \"answer\" column (loaded from its file: pure Python)")
    p.add_argument("--decode-tokenizer", default=None,
                   help="--reward gsm8k: Hugging Face tokenizer folder that decodes completions (the policy's own)")
    add_iteration_args(p, "generation batches (GRPO iterations) to run")
    p.add_argument("--prompts-per-iteration", type=int, default=16, help="megarlhf's train.global_batch_size")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--num-mini-batches", type=int, default=4, help="optimizer steps per pass over the batch")
    p.add_argument("--num-iterations", type=int, default=1, help="passes over each batch (GRPO's mu)")
    p.add_argument("--response-length", type=int, default=24, help="max_completion_length")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL (k3) to the reference; 0 = no reference")
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None, help="default: --epsilon")
    p.add_argument("--loss-type", choices=["dapo", "grpo"], default="dapo",
                   help="dapo: token sum / tokens of the optimizer step's batch; grpo: mean of sequence means")
    p.add_argument("--scale-rewards", choices=["group", "none"], default="group",
                   help="group: (r - group mean) / group std (GRPO); none: r - group mean (Dr. GRPO)")
    p.add_argument("--mask-truncated-completions", action="store_true")
    p.add_argument("--missing-eos-penalty", type=float, default=0.0)
    p.add_argument("--reward-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], default="constant")
    p.add_argument("--warmup-lr-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parse_iteration_args(p, argv)  # fmt: skip
    if (args.reward == "sort") != bool(args.sp_model) or (args.reward == "gsm8k") != bool(args.decode_tokenizer):
        p.error("--reward sort needs --sp-model; --reward gsm8k needs --decode-tokenizer (and only those)")
    rows = args.prompts_per_iteration * args.num_generations
    if rows % args.num_mini_batches or (rows // args.num_mini_batches) % args.micro_batch_size:
        p.error(f"{rows} rows per iteration must split into --num-mini-batches {args.num_mini_batches} "
                f"minibatches of whole micro-batches of {args.micro_batch_size}")  # fmt: skip
    return args


def sort_reward(prompt: str, response: str) -> float:
    """megarlhf.data.synthetic.sort_reward: fraction of positions where the response holds
    the right digit of the prompt's sorted digits, over max(response, target) tokens."""
    target = sorted(re.findall(r"\d", prompt))
    tokens = response.split()
    if not tokens or not target:
        return 0.0
    correct = sum(tok == want for tok, want in zip(tokens, target))
    return correct / max(len(tokens), len(target))


def make_reward(sp_model: str, eos_id: int, pad_id: int, missing_eos_penalty: float, meter: "Meter"):
    """A TRL reward function: the task rule on the decoded completion (- penalty without EOS).
    The rule's own scores go to `meter` (megarlhf's `objective/rule_score`, a check that
    both sides decode and score alike)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    pieces, unk = sp.get_piece_size(), sp.unk_id()

    def sort_reward_fn(prompts, completions, completion_ids, prompt_text, **_):
        out = []
        for text, ids in zip(prompt_text, completion_ids):
            finished = bool(ids) and ids[-1] == eos_id
            # TRL samples over the model's padded vocabulary: an id past the tokenizer's
            # pieces (which megarlhf never samples) reads as the unknown piece, a wrong token.
            ids = [i if i < pieces else unk for i in ids if i not in (eos_id, pad_id)]
            score = sort_reward(text, sp.decode(ids))
            meter.rule_scores.append(score)
            out.append(score - (0.0 if finished else missing_eos_penalty))
        return out

    return sort_reward_fn


def make_math_reward(tokenizer_dir: str, eos_id: int, pad_id: int, missing_eos_penalty: float, meter: "Meter"):
    """A TRL reward function: megarlhf's strict GSM8K rule (megarlhf/rollout/math_rewards.py,
    loaded from its file: it needs only the standard library) on the completion decoded by the
    policy's own tokenizer without special tokens (as megarlhf's rule_scores does), against the
    prompt row's "answer" column, minus the penalty without EOS."""
    import importlib.util

    from transformers import AutoTokenizer

    path = Path(__file__).resolve().parents[2] / "megarlhf" / "rollout" / "math_rewards.py"
    spec = importlib.util.spec_from_file_location("math_rewards", path)
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def gsm8k_reward_fn(prompts, completions, completion_ids, answer, **_):
        texts = [tok.decode([i for i in ids if i not in (eos_id, pad_id)], skip_special_tokens=True)
                 for ids in completion_ids]  # fmt: skip
        scores = rules.gsm8k_reward(completions=texts, answers=answer)
        meter.rule_scores.extend(scores)
        return [s - (0.0 if ids and ids[-1] == eos_id else missing_eos_penalty) for s, ids in zip(scores, completion_ids)]

    return gsm8k_reward_fn


class Meter:
    """Per-iteration clocks and token counts, fed by wrappers around the trainer's
    `_generate`, `_generate_and_score_completions`, `_calculate_rewards` and by a callback."""

    def __init__(self, steps_per_iteration: int, passes: int):
        self.steps_per_iteration, self.passes = steps_per_iteration, passes
        self.rows: list[dict] = []
        self.optimizer_steps = self.callback_steps = 0
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        """Start a new iteration's clock and counts at `now`."""
        self.start = now
        self.seconds = {"generate": 0.0, "rollout": 0.0, "reward": 0.0}
        self.generated = self.prompt_tokens = 0
        self.rule_scores: list[float] = []
        self.steps_before = self.optimizer_steps

    def clock(self, name: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.seconds[name] += time.perf_counter() - t0
            if name == "generate":  # (prompt_ids, completion_ids, ...): lists of id lists
                self.prompt_tokens += sum(len(ids) for ids in out[0])
                self.generated += sum(len(ids) for ids in out[1])
            return out

        return timed

    def step_end(self) -> None:
        """Called at every optimizer step's end; the iteration's last one closes its row."""
        self.callback_steps += 1
        if self.callback_steps % self.steps_per_iteration:
            return
        end = time.perf_counter()
        seconds = end - self.start
        trained = (self.prompt_tokens + self.generated) * self.passes
        s = self.seconds
        self.rows.append({
            "seconds": seconds, "generate": s["generate"], "score": s["rollout"] - s["generate"],
            "reward": s["reward"], "train": seconds - s["rollout"],
            "generated": self.generated, "trained": trained, "tokens": self.generated + trained,
            "optimizer_steps": self.optimizer_steps - self.steps_before,
            "rule_score": statistics.fmean(self.rule_scores) if self.rule_scores else float("nan"),
        })  # fmt: skip
        self.reset(end)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_threads(args.threads, args.seed)
    import trl
    from datasets import Dataset

    dataset = Dataset.from_list(read_jsonl(args.prompts))
    tokenizer = build_tokenizer(args.vocab, args.pad_id, args.eos_id, padding_side="left")
    policy = load_policy(args.policy)

    rows = args.prompts_per_iteration * args.num_generations  # sequences per generation batch
    mini = rows // args.num_mini_batches  # sequences per optimizer step
    steps_per_iteration = args.num_mini_batches * args.num_iterations
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_baseline_"),
        # One generation batch of `rows` sequences = steps_per_generation micro-batches;
        # an optimizer step = gradient_accumulation_steps micro-batches = one minibatch.
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=mini // args.micro_batch_size,
        steps_per_generation=rows // args.micro_batch_size,
        num_generations=args.num_generations, num_iterations=args.num_iterations,
        max_steps=args.iterations * steps_per_iteration,
        max_completion_length=args.response_length, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
        loss_type=args.loss_type, scale_rewards=args.scale_rewards,
        mask_truncated_completions=args.mask_truncated_completions, reward_weights=[args.reward_weight],
        # megarlhf's KL term is plain k3, not weighted by the importance ratio.
        use_bias_correction_kl=False,
        learning_rate=args.lr, warmup_steps=args.warmup_lr_steps, weight_decay=args.weight_decay,
        # TRL's "constant" ignores warm-up steps; megarlhf's constant schedule warms up first.
        lr_scheduler_type="constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
        max_grad_norm=args.max_grad_norm,
        # TRL turns activation checkpointing and bf16 on by default; megarlhf's tiny configs
        # recompute nothing and train in float32. No vLLM: transformers' generate.
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True, use_vllm=False,
        save_strategy="no", report_to=[], logging_steps=args.iterations * steps_per_iteration + 1,
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, log_completions=False,
    )  # fmt: skip
    meter = Meter(steps_per_iteration, args.num_iterations)
    if args.reward == "gsm8k":
        reward = make_math_reward(args.decode_tokenizer, args.eos_id, args.pad_id, args.missing_eos_penalty, meter)
    else:
        reward = make_reward(args.sp_model, args.eos_id, args.pad_id, args.missing_eos_penalty, meter)
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tokenizer
    )
    if policy.is_activation_checkpointing:
        raise SystemExit("error: activation checkpointing is on; the comparison assumes no recompute")
    if (args.beta > 0) != (trainer.ref_model is not None):
        raise SystemExit(f"error: beta {args.beta} but reference model {trainer.ref_model is not None}")
    if args.iterations >= len(dataset) // args.prompts_per_iteration:
        print(f"note: {args.iterations} iterations reach the end of the {len(dataset)}-prompt dataloader",
              file=sys.stderr)  # fmt: skip
    # Measurement only: the trainer calls these through `self`, so instance attributes wrap them.
    trainer._generate = meter.clock("generate", trainer._generate)
    trainer._generate_and_score_completions = meter.clock("rollout", trainer._generate_and_score_completions)
    trainer._calculate_rewards = meter.clock("reward", trainer._calculate_rewards)
    trainer.add_callback(iteration_callback(meter))
    count_optimizer_steps(meter, trainer.create_optimizer())  # the Trainer keeps it; train() reuses it
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # save_strategy="no": nothing worth keeping

    figures = summarize_iterations(meter.rows, args.warmup, PHASES)
    figures["rule_score"] = statistics.fmean(r["rule_score"] for r in meter.rows)  # all iterations
    config_keys = (
        "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
        "generation_batch_size", "num_generations", "num_iterations", "max_completion_length", "temperature",
        "top_p", "top_k", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards",
        "mask_truncated_completions", "use_bias_correction_kl", "learning_rate", "lr_scheduler_type",
    )  # fmt: skip
    parameters = {"policy": sum(p.numel() for p in policy.parameters())}
    result = iteration_result(args, meter.rows, parameters, config, config_keys, figures)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
