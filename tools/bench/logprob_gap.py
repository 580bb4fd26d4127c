#!/usr/bin/env python
"""The gap between the rollout engine's sampling log-probs and the trainer's, per dtype.

    python tools/bench/logprob_gap.py --set sft_model_path=runs/sft --set data.tokenizer=runs/data/sp.model \
        --set data.train_file=runs/data/prompts_train.jsonl            # examples/grpo_tiny.yaml
    python tools/bench/logprob_gap.py --dtypes bfloat16 --batches 4 --json gap.json --set ...

For each dtype (model.params_dtype), builds the GRPO trainer of --config on one process,
generates --batches rollout batches with its engine (KV cache, in that dtype) from the
first prompts, and compares the log-probs the engine kept while sampling with one more
forward pass of the actor at its training layout (what generation.old_logprobs=recompute
uses), on the response tokens. Prints, per dtype: tokens, mean |diff|, max |diff|, and
the importance ratio exp(trainer - engine) per token (mean, min, max, fraction outside
[0.8, 1.25]) and per sequence (exp of the summed difference). The figures are cited in
docs/precision.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile


def measure(config: str, overrides: list[str], dtype: str, batches: int) -> dict[str, float]:
    import torch

    from megarlhf.config import GRPOConfig, load_config
    from megarlhf.rollout.sampling import SamplingParams
    from megarlhf.trainers.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(GRPOConfig, config, [*overrides, f"model.params_dtype={dtype}", f"train.run_dir={run_dir}"])
        trainer = GRPOTrainer(cfg)
        g = cfg.generation
        sampling = SamplingParams(max_new_tokens=g.response_length, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        diffs, seq_diffs = [], []
        for k in range(batches):
            n = cfg.train.global_batch_size
            items = trainer.rollout_items([trainer.prompts[i] for i in range(k * n, (k + 1) * n)])
            batch = trainer.generate(items, sampling, salt=k)
            lp, _ = trainer.policy_logprobs(trainer.actor.model, trainer.ctx["actor"], batch)
            mask = batch["mask"].bool()
            d = (lp - batch["engine_logprobs"]).double()
            diffs.append(d[mask])
            seq_diffs.append((d * mask).sum(-1))
        trainer.run.close()
    d, s = torch.cat(diffs), torch.cat(seq_diffs)
    ratio, seq_ratio = d.exp(), s.exp()
    return {
        "tokens": int(d.numel()),
        "mean_abs_diff": d.abs().mean().item(),
        "max_abs_diff": d.abs().max().item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "ratio_outside_0.8_1.25": ((ratio < 0.8) | (ratio > 1.25)).double().mean().item(),
        "sequences": int(s.numel()),
        "seq_ratio_mean": seq_ratio.mean().item(),
        "seq_ratio_min": seq_ratio.min().item(),
        "seq_ratio_max": seq_ratio.max().item(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/grpo_tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated model.params_dtype values")
    p.add_argument("--batches", type=int, default=2, help="rollout batches per dtype")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    results = {dt: measure(args.config, args.set, dt, args.batches) for dt in args.dtypes.split(",")}
    for dt, r in results.items():
        print(
            f"{dt}: {r['tokens']} tokens, |trainer - engine| mean {r['mean_abs_diff']:.2e} max {r['max_abs_diff']:.2e}; "
            f"exp(diff) mean {r['ratio_mean']:.5f} [{r['ratio_min']:.4f}, {r['ratio_max']:.4f}], "
            f"outside [0.8, 1.25] {r['ratio_outside_0.8_1.25']:.4f}; per sequence ({r['sequences']}) "
            f"mean {r['seq_ratio_mean']:.5f} [{r['seq_ratio_min']:.4f}, {r['seq_ratio_max']:.4f}]"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
