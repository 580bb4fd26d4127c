"""SmolLM2-135M-Instruct's recipe in one command: SFT, then GRPO (over seeds) and DPO on
self-sampled pairs, both from the SFT result (or from the instruct model: --rl-from instruct),
and a before/after table of held-out accuracy under ONE scorer (`megarlhf generate`, greedy,
the same prompts, tokens and rule for every row).

    python examples/smollm2/prepare.py --out runs/smollm2      # once: model + task
    python examples/smollm2/recipe.py --root runs/smollm2            # the recipe (2 ranks)

Every stage is the ordinary CLI (`torchrun -m megarlhf sft|grpo|dpo|generate`) on the configs of
this folder, the model's shape, tokenizer and chat template coming from the converted checkpoint
(init_from / sft_model_path). The size knobs (--eval-prompts, --sft-steps, --grpo-steps, ...)
shrink it to a smoke test (tests/e2e/test_smollm2_recipe.py runs it on a tiny random Llama).
Writes <out>/recipe.json (every figure) and prints the table as Markdown. --resume keeps the rows
of recipe.json that are done (a stage and its evaluation) and runs the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STAGES = ("sft", "grpo", "dpo")
SET_STAGES = ("sft", "grpo", "dpo", "generate")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _head(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of src (all when n <= 0) as dst."""
    lines = [x for x in src.read_text().splitlines() if x.strip()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines[:n] if n > 0 else lines) + "\n")
    return dst


class Recipe:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = Path(args.out or args.root)
        self.model = Path(args.model or Path(args.root) / "model")
        self.data = Path(args.data or Path(args.root) / "data")
        self.work = self.out / "recipe"
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.done: dict[str, dict] = {}
        report = self.work / "recipe.json"
        if args.resume and report.is_file():
            self.done = {r["model"]: r for r in json.loads(report.read_text())["rows"]}
        self.extra: dict[str, list[str]] = {k: [] for k in SET_STAGES}
        for item in args.set:
            stage, _, override = item.partition(":")
            self.extra[stage].append(override)

    def reuse(self, name: str) -> bool:
        """--resume: the row of a model already trained and scored by an earlier run."""
        if name not in self.done:
            return False
        print(f"[recipe] {name}: done in an earlier run (--resume), kept", flush=True)
        self.rows.append(self.done[name])
        self.save()
        return True

    def megarlhf(self, *argv: str, log: str) -> float:
        """One CLI stage on --nproc ranks; its wall seconds. Output goes to <work>/<log>.log."""
        launcher = [sys.executable, "-m", "megarlhf"]
        if self.a.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.a.nproc), "-m", "megarlhf"]
        cmd = launcher + list(argv)
        cmd += self.extra[argv[0]]
        logf = self.work / f"{log}.log"
        print(f"[recipe] {log}: {' '.join(cmd)}  (log: {logf})", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(logf, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.perf_counter() - t0
        if rc != 0:
            tail = "".join(logf.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"[recipe] {log} failed (exit {rc}) after {seconds:.0f} s; last lines of {logf}:\n{tail}")
        print(f"[recipe] {log}: {seconds:.1f} s", flush=True)
        return seconds

    def evaluate(self, name: str, model: Path, stage: dict) -> None:
        """Greedy held-out accuracy of `model` under the one scorer; a table row."""
        out = self.work / f"eval_{name}.jsonl"
        seconds = self.megarlhf("generate", "--model", str(model), "--prompts", str(self.eval_prompts),
                                "--reward", self.a.reward, "--output", str(out), "temperature=0", f"data.max_length={self.a.prompt_length}",
                                f"max_new_tokens={self.a.eval_tokens}", f"batch_size={self.a.eval_batch}",
                                log=f"eval_{name}")  # fmt: skip
        s = json.loads(Path(f"{out}.summary.json").read_text())["samples"]
        self.rows.append({"model": name, "accuracy": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                          "prompts": s["prompts"], "eval_seconds": seconds, **stage})  # fmt: skip
        self.save()

    def train(self, stage: str, config: str, run_dir: Path, steps: int, *overrides: str) -> dict:
        """One training stage; its iterations, wall time and seconds per iteration (the trainer's own
        time/iteration mean when it logs one, else wall / iterations, start-up included)."""
        seconds = self.megarlhf(stage, "--config", str(HERE / config), f"train.run_dir={run_dir}",
                                f"train.max_steps={steps}", *overrides, log=run_dir.name)  # fmt: skip
        metrics = _jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        per_iter = [m[k] for m in metrics for k in ("time/iteration", "step_seconds") if k in m]
        info = {"stage": stage, "iterations": steps, "wall_seconds": seconds,
                "seconds_per_iteration": sum(per_iter) / len(per_iter) if per_iter else seconds / steps}  # fmt: skip
        rewards = [m[k] for m in metrics for k in ("objective/scores",) if k in m]
        if rewards:
            info["reward_curve"] = rewards
        for k in ("time/generate", "time/score", "time/train"):
            vals = [m[k] for m in metrics if k in m]
            if vals:
                info[k.replace("/", "_")] = sum(vals) / len(vals)
        return info

    def grpo(self, name: str, start: Path, seed: int) -> None:
        a = self.a
        run = self.out / name
        if self.reuse(name):
            return
        info = self.train("grpo", "grpo.yaml", run, a.grpo_steps, f"sft_model_path={start}",
                          f"data.train_file={self.data / 'math_train.jsonl'}", f"train.seed={seed}",
                          f"train.global_batch_size={a.grpo_prompts}", f"train.micro_batch_size={a.micro_batch}",
                          f"grpo.num_generations={a.generations}", f"generation.response_length={a.response_length}",
                          f"data.max_length={a.prompt_length}", f"optim.learning_rate={a.grpo_lr}")  # fmt: skip
        self.evaluate(name, run, {**info, "seed": seed, "start": a.rl_from})

    def run(self) -> list[dict]:
        a = self.a
        t0 = time.perf_counter()
        self.eval_prompts = _head(self.data / "math_test.jsonl", self.work / "eval_prompts.jsonl", a.eval_prompts)
        if not self.reuse("instruct"):
            self.evaluate("instruct", self.model, {"stage": "-", "iterations": 0})
        stages = a.stages.split(",")
        sft_run = self.out / "sft"
        if not self.reuse("sft") and "sft" in stages:  # a finished SFT row is kept even when only RL runs
            info = self.train("sft", "sft.yaml", sft_run, a.sft_steps, f"init_from={self.model}",
                              f"data.train_file={self.data / 'sft_train.jsonl'}", f"data.max_length={a.sft_length}",
                              f"train.micro_batch_size={a.micro_batch}",
                              f"train.global_batch_size={a.sft_batch}")  # fmt: skip
            self.evaluate("sft", sft_run, info)
        start = sft_run if a.rl_from == "sft" else self.model
        if a.rl_from == "sft" and {"grpo", "dpo"} & set(stages) and not (sft_run / "checkpoints" / "latest").is_file():
            raise SystemExit(f"[recipe] --rl-from sft: no SFT run in {sft_run}; add the sft stage or use --rl-from instruct")
        if "grpo" in stages:
            for seed in a.seeds:
                self.grpo(f"{a.rl_from}_grpo_s{seed}", start, seed)
        if "dpo" in stages and not self.reuse(f"{a.rl_from}_dpo"):
            self.dpo(f"{a.rl_from}_dpo", start)
        self.total = time.perf_counter() - t0
        self.save()
        print(self.table())
        return self.rows

    def dpo(self, name: str, start: Path) -> None:
        """Pairs sampled from `start` and ranked by the rule (make_pairs.py), then DPO from
        `start` (also the frozen reference)."""
        a = self.a
        prompts = _head(self.data / "math_train.jsonl", self.work / "pair_prompts.jsonl", a.pair_prompts)
        samples = self.work / f"{name}_pair_samples.jsonl"
        gen_s = self.megarlhf("generate", "--model", str(start), "--prompts", str(prompts),
                              "--reward", a.pair_reward or a.reward, "--output", str(samples),
                              f"n={a.pair_n}",  # not --n: torchrun reads it as an abbreviation of its --nnodes
                              "temperature=1.0", f"data.max_length={a.prompt_length}",
                              f"max_new_tokens={a.response_length}", f"batch_size={a.eval_batch}", log=f"{name}_pair_samples")  # fmt: skip
        sys.path.insert(0, str(HERE))
        from make_pairs import main as make_pairs

        pairs = self.work / f"{name}_pairs.jsonl"
        counts = make_pairs(["--prompts", str(prompts), "--samples", str(samples), "--out", str(pairs)])
        run = self.out / name
        info = self.train("dpo", "dpo.yaml", run, a.dpo_steps, f"init_from={start}", f"data.train_file={pairs}",
                          f"train.micro_batch_size={a.micro_batch}", f"train.global_batch_size={a.dpo_batch}",
                          f"data.max_length={a.prompt_length + a.response_length}")  # fmt: skip
        self.evaluate(name, run, {**info, "pairs": counts["pairs"], "pair_sampling_seconds": gen_s, "start": a.rl_from})

    def save(self) -> None:
        (self.work / "recipe.json").write_text(json.dumps({"args": vars(self.a), "rows": self.rows,
                                                           "total_seconds": getattr(self, "total", None)}, indent=1) + "\n")  # fmt: skip

    def paired(self, name: str, start: str) -> dict | None:
        """`name`'s greedy answers against its starting model's on the same prompts: how many
        went wrong -> right (gained) and right -> wrong (lost), and the accuracy difference
        with its 95% interval for paired proportions (the prompts are the same, so the
        interval is much narrower than the two Wilson intervals suggest)."""
        files = [self.work / f"eval_{m}.jsonl" for m in (start, name)]
        if not all(f.is_file() for f in files):
            return None
        before, after = ({r["index"]: r["score"] for r in _jsonl(f)} for f in files)
        n = len(after)
        gained = sum(1 for i, s in after.items() if s > 0.5 >= before[i])
        lost = sum(1 for i, s in after.items() if s <= 0.5 < before[i])
        diff = (gained - lost) / n
        half = 1.96 * math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
        return {"start": start, "gained": gained, "lost": lost, "diff": diff, "diff_low": diff - half, "diff_high": diff + half}

    def table(self) -> str:
        lines = [f"held-out accuracy: {self.a.reward}, greedy, {self.rows[0]['prompts']} prompts, "
                 f"{self.a.eval_tokens} new tokens, 95% Wilson CI; change vs the model it started from, paired "
                 f"95% CI (answers gained / lost); {self.a.nproc} ranks",  # fmt: skip
                 "| model | accuracy [95% CI] | change [95% CI] (gained / lost) | iterations | wall s | s/iteration |",
                 "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in self.rows:
            spi = f"{r['seconds_per_iteration']:.1f}" if "seconds_per_iteration" in r else "-"
            wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-"
            start = "instruct" if r["model"] == "sft" else r.get("start")
            p = self.paired(r["model"], start) if start else None
            change = "-"
            if p:
                r["paired"] = p
                change = (f"{100 * p['diff']:+.1f} pts [{100 * p['diff_low']:+.1f}, {100 * p['diff_high']:+.1f}] vs {start} "
                          f"({p['gained']} / {p['lost']})")  # fmt: skip
            lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] "
                         f"| {change} | {r['iterations']} | {wall} | {spi} |")  # fmt: skip
        stages = sum(r.get(k, 0.0) for r in self.rows for k in ("eval_seconds", "wall_seconds", "pair_sampling_seconds"))
        lines.append(f"total wall time {self.total:.0f} s; the stages of the table together {stages:.0f} s")
        return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="runs/smollm2", help="prepare.py's --out (model/ and data/ under it)")
    ap.add_argument("--model", default="", help="converted checkpoint (default <root>/model)")
    ap.add_argument("--data", default="", help="task folder (default <root>/data)")
    ap.add_argument("--out", default="", help="where runs go (default <root>)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per stage (data-parallel)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--rl-from", choices=("sft", "instruct"), default="sft",
                    help="the model GRPO and DPO start from (and DPO samples its pairs from)")
    ap.add_argument("--resume", action="store_true", help="keep the finished rows of <out>/recipe/recipe.json")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help=f"extra override for every command of one stage {SET_STAGES}, e.g. grpo:generation.temperature=0.7")
    ap.add_argument("--reward", default="gsm8k", help="the one scorer: a rule of megarlhf/rollout/math_rewards.py")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts (first N; 0 = all)")
    ap.add_argument("--eval-tokens", type=int, default=200, help="max new tokens of the greedy evaluation")
    ap.add_argument("--eval-batch", type=int, default=32, help="sequences per engine call")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--prompt-length", type=int, default=128, help="data.max_length of the prompts (tokens)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--sft-length", type=int, default=256, help="data.max_length of a worked solution (tokens)")
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--grpo-prompts", type=int, default=16, help="prompts per GRPO iteration")
    ap.add_argument("--generations", type=int, default=8, help="responses per prompt (GRPO group)")
    ap.add_argument("--response-length", type=int, default=128)
    ap.add_argument("--grpo-lr", type=float, default=5e-6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one GRPO run per seed")
    ap.add_argument("--pair-prompts", type=int, default=128, help="training prompts sampled for DPO pairs")
    ap.add_argument("--pair-n", type=int, default=4, help="samples per prompt for DPO pairs")
    ap.add_argument("--pair-reward", default="", help="rule that ranks the DPO samples (default --reward)")
    ap.add_argument("--dpo-steps", type=int, default=20)
    ap.add_argument("--dpo-batch", type=int, default=8)
    args = ap.parse_args(argv)
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        ap.error(f"--stages: unknown {sorted(bad)}; choose from {STAGES}")
    for item in args.set:
        if item.partition(":")[0] not in SET_STAGES or "=" not in item:
            ap.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {SET_STAGES}")
    return args


if __name__ == "__main__":
    Recipe(parse()).run()
