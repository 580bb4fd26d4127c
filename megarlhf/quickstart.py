"""`megarlhf quickstart`: the whole pipeline on a tiny model, on a laptop CPU.

Layer: entry point (called by the CLI). Stages, each a real run directory under
--run-dir:
    data/   the synthetic sorting task (examples/data/make_synthetic.py) + a sentencepiece
            tokenizer trained on it
    sft/    supervised fine-tuning (examples/sft_tiny.yaml)
    rm/     reward model initialised from the SFT policy (examples/rm_tiny.yaml)
    ppo/    PPO: actor and reference from sft/, critic from rm/; reward = the task's rule,
            the reward model scored alongside (examples/ppo_tiny.yaml); plots/ppo.png
SFT stops early (60 steps) on purpose: the policy has the answer format but often sorts
wrongly, which leaves PPO something to improve.
The configs are the example YAMLs shipped with the repository, with paths pointed at
--run-dir, so what the quick-start runs is exactly what a user would run by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from megarlhf.config import PPOConfig, RMConfig, SFTConfig, load_config
from megarlhf.parallel import init_distributed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _prepare_data(data_dir: Path, seed: int, is_main: bool) -> Path:
    """Rank 0 writes the task files and trains the tokenizer; the others wait."""
    from megarlhf.data import train_sentencepiece, write_synthetic

    tokenizer = data_dir / "sp.model"
    if is_main and not tokenizer.is_file():
        paths = write_synthetic(data_dir, seed=seed)
        train_sentencepiece([str(paths["tokenizer_corpus"])], str(data_dir / "sp"), vocab_size=64)
    dist.barrier()
    return tokenizer


def run_quickstart(
    run_dir: str, tp: int = 1, pp: int = 1, seed: int = 0, resume: bool = False,
    sft_steps: int = 60, rm_steps: int = 250, ppo_steps: int = 50,
) -> int:  # fmt: skip
    from megarlhf.trainers.ppo import PPOTrainer
    from megarlhf.trainers.rm import RewardModelTrainer
    from megarlhf.trainers.sft import SFTTrainer

    t_start = time.perf_counter()
    launch = init_distributed()
    is_main = launch.rank == 0
    root = Path(run_dir)
    data = root / "data"
    say = print if is_main else (lambda *a, **k: None)
    say(f"megarlhf quickstart: {launch.world_size} rank(s), layout tp={tp} pp={pp}, everything under {root}/")

    t0 = time.perf_counter()
    tokenizer = _prepare_data(data, seed, is_main)
    times = {"data + tokenizer": time.perf_counter() - t0}

    common = [f"data.tokenizer={tokenizer}", f"layout.tp={tp}", f"layout.pp={pp}", f"train.seed={seed}"]
    sft_cfg = load_config(
        SFTConfig, EXAMPLES / "sft_tiny.yaml",
        common + [f"data.train_file={data / 'sft.jsonl'}", f"data.eval_file={data / 'sft_test.jsonl'}",
                  f"train.run_dir={root / 'sft'}", f"train.max_steps={sft_steps}"],
    )  # fmt: skip
    t0 = time.perf_counter()
    sft = SFTTrainer(sft_cfg, resume="auto" if resume else None).fit()
    times["SFT"] = time.perf_counter() - t0
    if "stopped_by" in sft:
        return 0  # SIGUSR1/SIGTERM: the stage checkpointed; `quickstart --resume` continues

    rm_cfg = load_config(
        RMConfig, EXAMPLES / "rm_tiny.yaml",
        common + [f"data.train_file={data / 'prefs_train.jsonl'}", f"data.eval_file={data / 'prefs_test.jsonl'}",
                  f"train.run_dir={root / 'rm'}", f"init_from={root / 'sft'}", f"train.max_steps={rm_steps}"],
    )  # fmt: skip
    t0 = time.perf_counter()
    rm = RewardModelTrainer(rm_cfg, resume="auto" if resume else None).fit()
    times["reward model"] = time.perf_counter() - t0
    if "stopped_by" in rm:
        return 0  # SIGUSR1/SIGTERM: the stage checkpointed; `quickstart --resume` continues

    ppo_cfg = load_config(
        PPOConfig, EXAMPLES / "ppo_tiny.yaml",
        common + [f"data.train_file={data / 'prompts_train.jsonl'}", f"data.eval_file={data / 'prompts_test.jsonl'}",
                  f"train.run_dir={root / 'ppo'}", f"sft_model_path={root / 'sft'}",
                  f"reward_model_path={root / 'rm'}", f"train.max_steps={ppo_steps}"],
    )  # fmt: skip
    t0 = time.perf_counter()
    ppo = PPOTrainer(ppo_cfg, resume="auto" if resume else None).fit()
    times["PPO"] = time.perf_counter() - t0
    if "stopped_by" in ppo:
        return 0  # SIGUSR1/SIGTERM: the stage checkpointed; `quickstart --resume` continues

    if is_main:
        sft_first = json.loads((root / "sft" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        before, after = ppo["eval_before"], ppo["eval"]

        def change(key: str) -> str:
            return f"{before[key]:.3f} -> {after[key]:.3f}" if key in before and key in after else "n/a"

        rows = [
            ("SFT train loss (first step -> last)", f"{sft_first:.3f} -> {sft['final']['loss']:.3f}"),
            ("SFT held-out loss", f"{sft['eval']['eval_loss']:.3f}"),
            ("RM held-out accuracy", f"{rm['eval']['eval_accuracy']:.3f}"),
            ("RM held-out reward chosen / rejected",
             f"{rm['eval']['eval_rewards_chosen']:.2f} / {rm['eval']['eval_rewards_rejected']:.2f}"),
            ("PPO held-out task reward (SFT -> PPO)", change("eval/rule_score")),
            ("PPO held-out RM score (SFT -> PPO)", change("eval/rm_score")),
            ("PPO KL to the SFT policy (last iteration)", f"{ppo['final']['objective/kl']:.3f} nats"),
        ] + [(f"time: {k}", f"{v:.0f} s") for k, v in times.items()]  # fmt: skip
        rows.append(("time: total", f"{time.perf_counter() - t_start:.0f} s"))
        width = max(len(k) for k, _ in rows)
        print("\n" + "=" * (width + 24))
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print("=" * (width + 24))
        print(f"Run directories: {root / 'sft'}, {root / 'rm'}, {root / 'ppo'} (metrics.jsonl, checkpoints/, summary.json).")
        print(f"Reward and KL over PPO iterations: {root / 'ppo' / 'plots' / 'ppo.png'}")
    dist.barrier()
    return 0
