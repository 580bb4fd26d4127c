"""Command line: `megarlhf <command> ...`. Layer: cli (top of the package).

Every command runs SPMD: the same command on every rank (`torchrun -m megarlhf ...` or
`srun megarlhf ...`). Exit codes: 0 done; 2 bad config or data (the message names the
field or file:line); 3 a checkpoint that cannot be loaded, verified or saved; 4 training
diverged (non-finite loss or gradients past train.max_skipped_steps); other non-zero for
crashes.
"""

from __future__ import annotations

import argparse
import sys

from megarlhf import __version__


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on a tiny model: data, tokenizer, SFT, reward model, PPO",
        description=(
            "Generates the synthetic sorting task, trains a sentencepiece tokenizer, then "
            "SFT, a reward model (initialised from the SFT policy) and PPO (actor and "
            "reference from SFT, critic from the reward model) on a tiny Llama-style model, "
            "and prints a summary. Everything goes under --run-dir. Run it under "
            "torchrun for more than one rank (data-parallel unless --tp/--pp say otherwise)."
        ),
    )
    p.add_argument("--run-dir", default="runs/quickstart", help="where data, runs and checkpoints go")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data and weights seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue stages from their latest checkpoints")
    p.add_argument(
        "--sft-steps", type=int, default=60,
        help="SFT optimizer steps (default 60: a policy that has the format but often sorts wrongly, so PPO has room)",
    )  # fmt: skip
    p.add_argument("--rm-steps", type=int, default=250, help="reward-model optimizer steps (default 250)")
    p.add_argument("--ppo-steps", type=int, default=50, help="PPO iterations (default 50)")


def _add_selfcheck(sub) -> None:
    p = sub.add_parser(
        "selfcheck",
        help="train-step smoke run of a tiny Llama-style model at a TP/PP/DP layout",
        description=(
            "Builds a tiny Llama-style GPTModel on Megatron-Core at the given layout, runs "
            "forward+backward through Megatron's pipeline schedule and DDP, and checks the "
            "result against the same weights as one unsharded model on one rank. "
            "Run it under torchrun for more than one rank."
        ),
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--steps", type=int, default=3, help="forward+backward steps to time (default 3)")
    p.add_argument("--seed", type=int, default=1234, help="weights and data seed (default 1234)")


STAGES = {
    "sft": ("supervised fine-tuning of the policy", "SFTConfig", "megarlhf.trainers.sft", "SFTTrainer"),
    "rm": ("reward model (Bradley-Terry) training", "RMConfig", "megarlhf.trainers.rm", "RewardModelTrainer"),
    "dpo": ("direct preference optimisation against a frozen reference", "DPOConfig", "megarlhf.trainers.dpo", "DPOTrainer"),
    "ppo": ("PPO with actor, critic, reference and reward", "PPOConfig", "megarlhf.trainers.ppo", "PPOTrainer"),
    "grpo": ("GRPO / RLOO / REINFORCE++: critic-free, group-relative advantages", "GRPOConfig", "megarlhf.trainers.grpo", "GRPOTrainer"),
}


def _fields_help(config_name: str) -> str:
    import megarlhf.config as config_module
    from megarlhf.config import describe

    rows = describe(getattr(config_module, config_name))
    width = max(len(k) for k, _, _ in rows)
    lines = ["config fields (YAML sections, or dotted overrides key=value):"]
    for key, default, doc in rows:
        lines.append(f"  {key:<{width}}  {doc} [default: {default}]")
    return "\n".join(lines)


def _add_stage(sub, name: str) -> None:
    summary, config_name, _, _ = STAGES[name]
    p = sub.add_parser(
        name,
        help=summary,
        description=f"megarlhf {name}: {summary}. Runs SPMD: the same command on every rank.",
        epilog=_fields_help(config_name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (sections: model, layout, optim, data, train, ...)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' = continue from run_dir/checkpoints/latest if it exists (or the newest checkpoint that "
        "verifies against its checksums, if latest does not); 'strict' = latest, which must verify; "
        "or a checkpoint path (must verify). A bad checkpoint exits with code 3 naming the file",
    )
    if name in ("ppo", "grpo"):
        p.add_argument(
            "--replay-rollouts",
            metavar="PATH",
            help="run one update on a batch dumped by train.dump_rollouts (run_dir/rollouts/iter_N.parquet) "
            "instead of training: no generation; with --resume at the dumping run's checkpoint of "
            "iteration N-1 it reproduces iteration N",
        )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.learning_rate=3e-4")


GENERATE_FLAGS = {"model": "model_path", "prompts": "prompts", "output": "output", "n": "n", "reward": "reward_fn", "tp": "layout.tp"}
"""`megarlhf generate` flags: shorthands of config fields (--n 8 == n=8)."""


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="batch generation from a checkpoint or HF folder; best-of-n; scores with a confidence interval",
        description=(
            "megarlhf generate: samples responses to a prompt file with the rollout engine (TP x DP on every "
            "rank of the world), optionally scores them with a rule (reward_fn) and/or a reward model, keeps "
            "the best of n, writes one JSONL line per sample and prints the mean score / accuracy with its "
            "confidence interval. Runs SPMD: the same command on every rank."
        ),
        epilog=_fields_help("GenerateConfig"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (or only key=value overrides)")
    p.add_argument("--model", help="= model_path: a megarlhf checkpoint or a Hugging Face folder")
    p.add_argument("--prompts", help="= prompts: the prompt JSONL file")
    p.add_argument("--output", help="= output: the JSONL to write")
    p.add_argument("--n", help="= n: samples per prompt")
    p.add_argument("--reward", help="= reward_fn: 'module:function' or gsm8k, math, boxed, ...")
    p.add_argument("--tp", help="= layout.tp: tensor-parallel size")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields, e.g. temperature=0.7 max_new_tokens=128")


def _add_launch(sub) -> None:
    from megarlhf.launch import add_arguments

    p = sub.add_parser(
        "launch",
        help="render a stage's SLURM batch script (srun + torchrun) and submit it, or print it with --dry-run",
        description=(
            "Checks the config and its role layouts against --nodes x --gpus-per-node ranks, renders "
            "an sbatch script (c10d rendezvous on the first node, SIGUSR1 before the time limit -> "
            "checkpoint -> requeue -> --resume auto, log in run_dir/logs/slurm-<jobid>.out) and submits "
            "it with sbatch; prints the job id. Exit codes: 0 done, 2 bad config/layout/option, 1 sbatch failed."
        ),
    )
    add_arguments(p, list(STAGES))


def _add_plan(sub) -> None:
    from megarlhf.plan.command import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "plan",
        help="size a run: per-GPU memory by role (fits?), seconds per phase, fastest layout that fits",
        description=DESCRIPTION + " Pure Python: no GPU or Megatron-Core needed. Exit code 2 on bad input.",
    )
    add_arguments(p)


def _add_checkpoint(sub) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="check checkpoints against the checksums recorded when they were saved",
        description=(
            "megarlhf checkpoint verify PATH: PATH is one iter_NNNNNNN folder, or a run directory / its "
            "checkpoints/ folder (every checkpoint in it). One line per checkpoint; each bad file is named. "
            "No world, no torch.distributed. Exit codes: 0 all verify, 3 any does not."
        ),
    )
    p.add_argument("action", choices=["verify"], help="what to do (verify)")
    p.add_argument("path", help="an iter_NNNNNNN folder, a checkpoints/ folder or a run directory")


def _run_checkpoint(args) -> int:
    from pathlib import Path

    from megarlhf.checkpoint.verify import verify_checkpoint

    path = Path(args.path)
    if path.name.startswith("iter_"):
        ckpts = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = root.iterdir() if root.is_dir() else []
        ckpts = sorted(p for p in found if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(".tmp"))
    if not ckpts or not all(c.is_dir() for c in ckpts):
        print(f"megarlhf checkpoint: error: no checkpoint at {path}", file=sys.stderr)
        return 3
    bad = 0
    for ckpt in ckpts:
        problems, count = verify_checkpoint(ckpt)
        bad += bool(problems)
        print(f"{ckpt}: " + ("FAILED\n  " + "\n  ".join(problems) if problems else f"ok ({count} files)"))
    return 3 if bad else 0


QUIET_HELP = (
    "no progress bars or per-step lines on the terminal (run_dir/logs/train.log keeps them); "
    "warnings, errors and results still print. Also MEGARLHF_QUIET=1"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megarlhf",
        description="RLHF for large language models on Megatron-Core.",
        epilog="Multi-rank: torchrun --nproc-per-node N -m megarlhf <command> ...",
    )
    parser.add_argument("--version", action="version", version=f"megarlhf {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in STAGES:
        _add_stage(sub, name)
    _add_generate(sub)
    _add_quickstart(sub)
    _add_launch(sub)
    _add_selfcheck(sub)
    _add_plan(sub)
    _add_checkpoint(sub)
    for command in sub.choices.values():  # `megarlhf --quiet sft ...` and `megarlhf sft --quiet ...`
        command.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def run_stage(name: str, config_path: str | None, overrides: list[str], resume: str | None, replay: str | None = None) -> dict:
    import importlib

    import megarlhf.config as config_module
    from megarlhf.checkpoint.source import apply_model_source
    from megarlhf.config import load_config

    _, config_name, module, trainer_name = STAGES[name]
    cfg = load_config(getattr(config_module, config_name), config_path, overrides, prepare=apply_model_source)
    trainer = getattr(importlib.import_module(module), trainer_name)(cfg, resume=resume)
    return trainer.replay(replay) if replay else trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.quiet:
        from megarlhf.output import set_quiet

        set_quiet()
    if args.command == "launch":  # before the imports below: a login node renders without Megatron-Core
        import megarlhf.config as config_module
        from megarlhf.launch import launch_main

        # key=value overrides may come after options (argparse keeps only those right after the stage)
        return launch_main(args, extra, getattr(config_module, STAGES[args.stage][1]))
    if args.command == "plan" and not extra:  # pure Python: no torch or Megatron-Core import
        from megarlhf.plan.command import run as run_plan

        return run_plan(args)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "checkpoint":  # pure Python: no world, no torch import
        return _run_checkpoint(args)
    from megarlhf.checkpoint.dist_ckpt import CheckpointError
    from megarlhf.config import ConfigError, DataError
    from megarlhf.config.errors import TrainingDiverged
    from megarlhf.parallel import LayoutError
    from megarlhf.rollout.rewards import RewardError

    try:
        if args.command in STAGES:
            run_stage(args.command, args.config, args.overrides, args.resume, getattr(args, "replay_rollouts", None))
            return 0
        if args.command == "generate":
            from megarlhf.config import GenerateConfig, load_config
            from megarlhf.generate import run_generate

            flags = [f"{key}={getattr(args, flag)}" for flag, key in GENERATE_FLAGS.items() if getattr(args, flag) is not None]
            run_generate(load_config(GenerateConfig, args.config, flags + args.overrides))
            return 0
        if args.command == "quickstart":
            from megarlhf.quickstart import run_quickstart

            return run_quickstart(
                args.run_dir, tp=args.tp, pp=args.pp, seed=args.seed, resume=args.resume,
                sft_steps=args.sft_steps, rm_steps=args.rm_steps, ppo_steps=args.ppo_steps,
            )  # fmt: skip
        if args.command == "selfcheck":
            from megarlhf.selfcheck import run_selfcheck

            return run_selfcheck(tp=args.tp, pp=args.pp, steps=args.steps, seed=args.seed)
    except (ConfigError, DataError, LayoutError) as err:
        print(f"megarlhf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"megarlhf {args.command}: checkpoint error: {err}", file=sys.stderr)
        return 3
    except TrainingDiverged as err:
        print(f"megarlhf {args.command}: {err}", file=sys.stderr)
        return 4
    except RewardError as err:  # the user's reward function: its message, not ours
        print(f"megarlhf {args.command}: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from megarlhf.parallel.distributed import lost_peers

        if (who := lost_peers(err)) is None:
            raise
        print(
            f"megarlhf {args.command}: error: {who} during a collective ({str(err).splitlines()[0][:300]}); "
            f"this rank stops too. Continue from the last checkpoint with --resume auto",
            file=sys.stderr,
        )
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
