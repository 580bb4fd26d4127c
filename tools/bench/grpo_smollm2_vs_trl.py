#!/usr/bin/env python
"""GRPO on a real pretrained model: megarlhf vs Hugging Face TRL's GRPOTrainer on
SmolLM2-135M-Instruct (134.5M parameters), the arithmetic task and its strict GSM8K reward.

    python examples/smollm2/prepare.py --out runs/smollm2            # once: model + task
    python tools/bench/grpo_smollm2_vs_trl.py --root runs/smollm2    # 5 iterations per side, first 1 skipped
    python tools/bench/grpo_smollm2_vs_trl.py --root runs/smollm2 --set grpo.num_generations=4 --json out.json

The SmolLM2 sibling of tools/bench/grpo_vs_trl.py (same measurement, same table; its
docstring defines iterations, tokens, the phases and the settings mapped onto TRL's
GRPOConfig). What changes here:
  - the policy is the converted SmolLM2 checkpoint (<root>/model) for megarlhf and the
    Hugging Face folder it was converted from (<root>/hf, float32) for TRL: the same weights
    (their logits agree exactly, docs/smollm2.md);
  - the prompts are the task's training prompts (<root>/data/math_train.jsonl) rendered by
    megarlhf with the model's own ChatML template (default system turn included); TRL gets
    those token ids through the placeholder tokenizer of tools/bench/trl_common.py, so both
    sides generate from the same ids;
  - the reward is megarlhf/rollout/math_rewards.py's strict `gsm8k` rule against each
    prompt's answer on both sides (TRL loads the same file; it is pure Python), completions
    decoded by the model's own tokenizer;
  - the settings are examples/smollm2/grpo.yaml's (16 prompts x 8 responses, 128 response
    tokens, micro-batch 4, 4 optimizer steps per iteration, no KL) with --set overrides,
    one process each, --threads threads, float32.
At 135M parameters the matrix products dominate (unlike the 0.6M toy of grpo_vs_trl.py):
this is the size at which the generate / score / train split says where time goes.
Needs --trl-python: a virtualenv with TRL 1.16, datasets and transformers (make one with
`python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 "trl==1.16.*" datasets`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_vs_trl import exit_if_unmapped_grpo, print_table, run_megarlhf, trl_command  # noqa: E402
from sft_rm_dpo_vs_trl import id_text  # noqa: E402
from vs_trl_common import (  # noqa: E402
    iteration_parser, measure_both_sides, parse_iteration_args, run_trl_baseline, write_json,
    write_prompts,
)  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
GRPO_YAML = "examples/smollm2/grpo.yaml"
RULE = "gsm8k"


def parse_args(argv=None):
    p = iteration_parser(__doc__, "grpo", "runs, logs and TRL's JSONL go here")
    p.set_defaults(iterations=5, warmup=1, work_dir="runs/bench_grpo_smollm2")
    p.add_argument("--root", default="runs/smollm2", help="examples/smollm2/prepare.py's --out (model/, hf/, data/)")
    trl_help = "python of a virtualenv with TRL 1.16, datasets and transformers"
    args = parse_iteration_args(p, argv, GRPO_YAML, "/tmp/trlvenv/bin/python", trl_help,
                                "import datasets, transformers, trl")  # fmt: skip
    root = Path(args.root)
    missing = [str(root / x) for x in ("model", "hf", "data/math_train.jsonl") if not (root / x).exists()]
    if missing:
        p.error(f"--root {root}: {', '.join(missing)} missing; run python examples/smollm2/prepare.py --out {root}")
    if args.sft or args.data_dir:
        p.error("--sft / --data-dir: this benchmark starts from the converted model and the task in --root")
    return args


def grpo_config(args, work: Path):
    """The GRPOConfig both sides run (the model's shape, tokenizer and template from
    <root>/model), and its command-line overrides."""
    from megarlhf.checkpoint.source import apply_model_source
    from megarlhf.config import GRPOConfig, load_config

    root = Path(args.root).resolve()
    overrides = [
        f"sft_model_path={root / 'model'}", f"data.train_file={root / 'data' / 'math_train.jsonl'}", "data.eval_file=",
        "reward_model_path=", f"reward_fn={RULE}", f"train.run_dir={work / 'megarlhf_grpo'}",
        f"train.max_steps={args.iterations}", "train.eval_steps=0", "train.save_steps=0",
        "rollout_correction.measure=false", *args.overrides,
    ]  # fmt: skip
    cfg = load_config(GRPOConfig, REPO / GRPO_YAML, overrides, prepare=apply_model_source)
    exit_if_unmapped_grpo(cfg, RULE)
    return cfg, overrides


def run_trl(cfg, args, work: Path, env: dict) -> dict:
    from megarlhf.data.template import tokenizer_and_template

    tok, _ = tokenizer_and_template(cfg.data)
    prompts = work / "trl_prompts.jsonl"
    rows = write_prompts(cfg, prompts, lambda it: {"prompt": id_text(it["prompt_ids"]), "answer": it["answer"]})
    hf = Path(args.root).resolve() / "hf"
    cmd = trl_command(cfg, args, hf, prompts, tok.pad_id, tok.eos_id, ["--reward", "gsm8k", "--decode-tokenizer", hf])
    r = run_trl_baseline(cmd, work / "trl_grpo.log", env)
    r.update(prompts=rows, sequences_per_second=cfg.rollout_rows * r["timed_iterations"] / r["seconds"])
    return r


def main(argv=None) -> int:
    import os

    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    cfg, overrides = grpo_config(args, work)
    ours, trl = measure_both_sides(
        "grpo", args, lambda: run_megarlhf(cfg, overrides, work, env, args.warmup, GRPO_YAML),
        lambda: run_trl(cfg, args, work, env),
    )  # fmt: skip
    print_table(ours, trl, cfg, args)
    if args.json:
        ratio = None
        if trl:
            ratio = {k: ours[k] / trl[k] for k in ("median_tokens_per_second", "total_tokens_per_second")}
            ratio["iteration_throughput"] = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
            ratio["peak_rss"] = ours["peak_rss_mib"] / trl["peak_rss_mib"]
        write_json(args, overrides, ours, trl, ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
