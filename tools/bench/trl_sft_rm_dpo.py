#!/usr/bin/env python
"""Training throughput of Hugging Face TRL's SFTTrainer / RewardTrainer / DPOTrainer on a tiny Llama.

The baseline half of tools/bench/sft_rm_dpo_vs_trl.py; runs in a virtualenv with TRL installed and
never imports megarlhf or Megatron. Reads JSONL written by sft_rm_dpo_vs_trl.py with
megarlhf's token ids, so both frameworks train on the same tokens:
  - SFT rows {"input_ids", "completion_mask"}, RM rows {"chosen_ids", "rejected_ids"}:
    pre-tokenized, trained from a fresh model of the given shape;
  - DPO rows {"prompt", "chosen", "rejected"}: id text, one piece `<id{i}>` per token id
    (TRL 1.16's DPOTrainer takes text only). The placeholder tokenizer encodes each piece
    to its id and nothing else, so TRL's own tokenization gives back megarlhf's ids. The
    policy and the reference are two copies of --policy (a Hugging Face folder exported
    from megarlhf's SFT run); --rpo-alpha adds TRL's "sft" loss (NLL of the chosen
    answers) with that weight, RPO as megarlhf's rpo_alpha.

    /tmp/trlvenv/bin/python tools/bench/trl_sft_rm_dpo.py --stage sft --data work/trl_sft.jsonl --steps 60
    /tmp/trlvenv/bin/python tools/bench/trl_sft_rm_dpo.py --stage dpo --data work/trl_dpo.jsonl --policy work/hf/sft

Timing, per optimizer step, from a TrainerCallback:
  - wall: previous on_step_end -> this on_step_end. Includes fetching and collating the
    step's batches, as megarlhf's `step_seconds` does (its clock starts before it builds
    the microbatches). This is the figure compared with megarlhf.
  - compute: on_step_begin -> on_step_end. Trainer fetches a step's batches *before*
    on_step_begin, so this leaves data loading out.
Tokens = non-pad tokens (attention_mask sum) of the batches of that step, counted in a
wrapped data collator; batches are collated in order, so a FIFO pairs them with steps.
A DPO batch holds both sides of its pairs (chosen rows, then rejected rows), so its
tokens are those of the chosen + rejected sequences; the reference's forward pass runs
inside the step, as in megarlhf by default, or (--precompute-ref-log-probs, TRL's
precompute_ref_log_probs, megarlhf's same-named option) once over the data before the
first step, outside the step clocks on both sides. --torch-compile sets TrainingArguments'
torch_compile (the model's forward through torch.compile), the counterpart of megarlhf's
train.compile.
`positions` = padded positions computed (TRL pads each batch to its longest row).
The first --warmup steps are skipped. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_common import add_shared_args, build_tokenizer, load_policy, read_jsonl, use_threads, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["sft", "rm", "dpo"], required=True)
    p.add_argument("--data", required=True, help="JSONL of megarlhf's token ids (see above)")
    p.add_argument("--policy", default=None, help="dpo: HF LlamaForCausalLM folder, initial policy and reference")
    p.add_argument("--beta", type=float, default=0.1, help="dpo: beta")
    p.add_argument("--loss-type", default="sigmoid", help="dpo: TRL loss_type (sigmoid = DPO)")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="dpo: weight of RPO's NLL of the chosen answers (TRL's 'sft' loss added to --loss-type)")
    p.add_argument("--precompute-ref-log-probs", action="store_true",
                   help="dpo: the reference scores the data once, before training")
    p.add_argument("--torch-compile", action="store_true", help="TrainingArguments.torch_compile=True")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=64)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--tie-embeddings", action="store_true", help="default: untied, as megarlhf's default")
    p.add_argument("--micro-batch-size", type=int, default=16, help="SFT sequences / RM pairs per microbatch")
    p.add_argument("--grad-accum", type=int, default=2, help="microbatches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate schedule after the warm-up (megarlhf's optim.lr_scheduler_type)")
    p.add_argument("--warmup-lr-steps", type=int, default=20, help="learning-rate warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    add_shared_args(p, vocab_help="model vocabulary (megarlhf's padded vocab); also the placeholder tokenizer's ids")
    args = p.parse_args(argv)  # fmt: skip
    if args.stage == "dpo" and not args.policy:
        p.error("--stage dpo needs --policy (a Hugging Face folder of the SFT policy)")
    return args


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(args.seed)
    if args.stage == "dpo":
        return load_policy(args.policy)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=args.tie_embeddings, pad_token_id=args.pad_id, eos_token_id=args.eos_id,
        bos_token_id=None, use_cache=False, attn_implementation="sdpa", dtype=torch.float32,
    )  # fmt: skip
    if args.stage == "sft":
        return LlamaForCausalLM(config).float()
    config.num_labels = 1
    return LlamaForSequenceClassification(config).float()


class CountingCollator:
    """Wraps a collator; remembers, in order, each batch's non-pad tokens and padded positions."""

    def __init__(self, inner):
        self.inner = inner
        self.counts: deque[tuple[int, int]] = deque()

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch["attention_mask"]  # [rows, longest in batch]
        self.counts.append((int(mask.sum()), mask.numel()))
        return batch


def make_timer(collator: CountingCollator, grad_accum: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.rows: list[dict] = []
            self.last_end = self.begin = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.last_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            end = time.perf_counter()
            tokens, positions = map(sum, zip(*(collator.counts.popleft() for _ in range(grad_accum))))
            self.rows.append(
                {"tokens": tokens, "positions": positions, "wall": end - self.last_end, "compute": end - self.begin}
            )
            self.last_end = end

    return StepTimer()


def summarize(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    if not timed:
        raise SystemExit(f"error: no timed steps: {len(rows)} steps run, --warmup {warmup}; raise --steps")
    tokens = sum(r["tokens"] for r in timed)
    out = {"timed_steps": len(timed), "tokens": tokens, "positions": sum(r["positions"] for r in timed)}
    for clock in ("wall", "compute"):
        seconds = sum(r[clock] for r in timed)
        out[f"{clock}_seconds"] = seconds
        out[f"{clock}_median_tokens_per_second"] = statistics.median(r["tokens"] / r[clock] for r in timed)
        out[f"{clock}_total_tokens_per_second"] = tokens / seconds
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    use_threads(args.threads)
    import torch
    import trl
    from datasets import Dataset

    dataset = Dataset.from_list(read_jsonl(args.data))
    tokenizer = build_tokenizer(args.vocab, args.pad_id, args.eos_id)
    model = build_model(args)

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trl_baseline_"), max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, warmup_steps=args.warmup_lr_steps,
        # TRL's "constant" ignores warm-up steps; megarlhf's constant schedule warms up first.
        lr_scheduler_type="constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, max_length=args.max_length,
        # TRL turns activation (gradient) checkpointing and bf16 on by default; megarlhf's
        # configs recompute nothing and train in float32.
        activation_checkpointing=False, use_cpu=True, bf16=False, dataloader_num_workers=0,
        dataset_num_proc=None, report_to=[], save_strategy="no", logging_steps=args.steps + 1,
        disable_tqdm=True, seed=args.seed, torch_compile=args.torch_compile,
    )  # fmt: skip
    if args.stage == "sft":
        config = trl.SFTConfig(**common, packing=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elif args.stage == "rm":
        config = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    else:
        # RPO (megarlhf's rpo_alpha): DPO loss + alpha x NLL of the chosen answers.
        losses = [args.loss_type, "sft"] if args.rpo_alpha else [args.loss_type]
        config = trl.DPOConfig(
            **common, beta=args.beta, loss_type=losses, loss_weights=[1.0, args.rpo_alpha][: len(losses)],
            precompute_ref_log_probs=args.precompute_ref_log_probs,
        )  # fmt: skip
        trainer = trl.DPOTrainer(
            model=model, ref_model=load_policy(args.policy), args=config, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip
    if len(trainer.train_dataset) != len(dataset):
        raise SystemExit(f"error: TRL dropped {len(dataset) - len(trainer.train_dataset)} of {len(dataset)} rows")

    if model.is_activation_checkpointing:
        raise SystemExit("error: activation checkpointing is on; the comparison assumes no recompute")
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator  # read when train() builds the dataloader
    timer = make_timer(collator, args.grad_accum)
    trainer.add_callback(timer)
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # save_strategy="no": nothing worth keeping

    result = {
        "framework": "trl", "stage": args.stage, "steps": len(timer.rows), "warmup": args.warmup,
        "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
        "versions": versions(),
        **summarize(timer.rows, args.warmup), "per_step": timer.rows,
    }  # fmt: skip
    if args.stage == "dpo":
        result["dpo"] = {k: getattr(trainer, k) for k in ("beta", "loss_types", "loss_weights")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
