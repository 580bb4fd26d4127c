#!/usr/bin/env python
"""SFT, reward-model and DPO training tokens/s: megarlhf vs Hugging Face TRL on this machine.

    python tools/bench/sft_rm_dpo_vs_trl.py                                   # all three stages, 60 steps each
    python tools/bench/sft_rm_dpo_vs_trl.py --stages rm --steps 30 --json out.json
    python tools/bench/sft_rm_dpo_vs_trl.py --stages dpo --sft runs/sft       # DPO from an existing SFT run
    python tools/bench/sft_rm_dpo_vs_trl.py --stages dpo --set rpo_alpha=0     # plain DPO, no RPO term
    python tools/bench/sft_rm_dpo_vs_trl.py --set train.compile=true           # megarlhf compiled, TRL eager
    python tools/bench/sft_rm_dpo_vs_trl.py --set train.compile=true --trl-compile   # both compiled

Same model, data and batch shapes on both sides: the tiny Llama of examples/sft_tiny.yaml,
examples/rm_tiny.yaml and examples/dpo_tiny.yaml (read from those files, passed on to
TRL), the synthetic sorting task, global batch = micro batch x accumulation of the config,
learning rate and schedule, one process, float32. Steps:
  1. build the task's data and sentencepiece tokenizer in <data-dir> (kept when present);
     for DPO also a short SFT policy (--sft-steps, examples/sft_tiny.yaml) unless --sft
     names a run, exported to a Hugging Face folder (tools/convert_megatron_to_hf.py):
     both sides start the policy and the frozen reference from it;
  2. tokenize with megarlhf's own datasets and write JSONL for TRL, so both sides train on
     the same token ids (SFT: input_ids + completion_mask = megarlhf's loss_mask; RM:
     chosen_ids + rejected_ids; DPO: prompt / chosen / rejected as id text, see
     tools/bench/trl_sft_rm_dpo.py, split where megarlhf's loss mask starts);
  3. run `python -m megarlhf sft|rm|dpo` and read tokens_per_second/step_seconds per step
     from its metrics.jsonl (the end-of-run checkpoint is outside the timed steps);
  4. run tools/bench/trl_sft_rm_dpo.py with --trl-python (a virtualenv with TRL; it never imports
     megarlhf): SFTTrainer, RewardTrainer, DPOTrainer (beta and loss_type of the config;
     rpo_alpha > 0, the example's RPO term, as TRL's loss_type ["sigmoid", "sft"] with
     loss_weights [1, rpo_alpha]; reference model in memory, its log-probs computed in
     every step as megarlhf does; megarlhf's win-rate evaluation off);
     --trl-compile gives TRL torch_compile=True (its model's forward through
     torch.compile), the counterpart of megarlhf's --set train.compile=true; a compiling
     side pays its compile in its first, skipped, steps;
  5. print a table (with each side's peak RSS: ru_maxrss of its process from os.wait4)
     and write --json if asked.
Tokens/s = non-pad tokens of the batches trained in a step / wall time of that step (RM
and DPO: chosen + rejected sequences); the first --warmup steps are skipped on both
sides. Reported: the median of per-step rates, and total tokens / total time of the timed
steps. A step's clock covers building its batches on both sides (megarlhf's DPO step
also its reference forward, done while collating); TRL's compute-only clock (data
loading excluded, reference forward included) is shown too.

Differences left in (each side's own behaviour): megarlhf groups a step's samples by
length and pads each microbatch to its own longest (8-multiples on GPU only), TRL pads
each microbatch, in sample order, to its longest row (the table shows the non-pad share
of computed positions); each side draws its own sample order; optimizers
are each side's default (Megatron's Adam vs TRL's fused AdamW). (Both samplers take
torch.randperm from a generator seeded with train.seed: in the DPO runs every step's
non-pad token count matched, i.e. both sides trained on the same batches.) DPO: TRL computes
log-probs with its fused LM head (only completion positions, in tiles), megarlhf takes the
full logits and gathers the response tokens; TRL's DPOTrainer also computes entropy, mean
logits and top-1 accuracy of every completion token for its metrics; RPO's NLL is the
token mean of each chosen response averaged over pairs in megarlhf, the token mean over
all chosen tokens of a micro-batch in TRL (same work, other weights). On a 2-core machine
any other load makes 2-thread figures meaningless (a warning is printed): run it idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = {  # stage -> (example config, config class, training file of the synthetic task)
    "sft": ("examples/sft_tiny.yaml", "SFTConfig", "sft.jsonl"),
    "rm": ("examples/rm_tiny.yaml", "RMConfig", "prefs_train.jsonl"),
    "dpo": ("examples/dpo_tiny.yaml", "DPOConfig", "prefs_train.jsonl"),
}
PAIRED = ("rm", "dpo")  # a preference pair is two rows: chosen and rejected


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="default: sft rm dpo")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per stage and side (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--work-dir", default="runs/bench_vs_trl", help="runs, logs and TRL's JSONL go here")
    p.add_argument("--data-dir", default=None, help="task data + sp.model; default <work-dir>/data, built if missing")
    p.add_argument("--sft", default=None,
                   help="dpo: megarlhf SFT run to start from (default: <work-dir>/sft, trained if missing)")
    p.add_argument("--sft-steps", type=int, default=40, help="dpo: SFT steps when training one (default 40)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further override of the example config of every stage run (repeatable; use with one "
                        "--stages); the TRL side follows the mapped fields")
    p.add_argument("--trl-compile", action="store_true", help="TRL: torch_compile=True (default: eager)")
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="python of a virtualenv with TRL")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (OMP_NUM_THREADS)")
    p.add_argument("--json", default=None, help="also write settings and figures to this file")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    check_trl_python(p, args.trl_python, "import datasets, tokenizers, transformers, trl",
                     "it must be the python of a virtualenv with TRL (pip install trl there, with the same torch)")
    return args


def check_trl_python(p: argparse.ArgumentParser, trl_python: str, trl_imports: str, fix: str) -> None:
    """Exit 2 (argparse's usage error, naming `fix`) unless `trl_python` runs `trl_imports`,
    the TRL side's imports: a missing package then stops a benchmark before megarlhf's
    set-up and runs, not minutes after them."""
    try:
        probe = subprocess.run([trl_python, "-c", trl_imports], capture_output=True, text=True)
    except OSError as e:
        p.error(f"--trl-python {trl_python}: {e.strerror}; {fix}")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        p.error(f"--trl-python {trl_python} cannot run `{trl_imports}`: {last}; {fix}")


def prepare_data(data_dir: Path) -> Path:
    """The sorting task and its tokenizer in `data_dir` (written unless all present); returns sp.model."""
    from megarlhf.data import train_sentencepiece, write_synthetic

    model = data_dir / "sp.model"
    if not all((data_dir / f).is_file() for f in [model.name] + [s[2] for s in STAGES.values()]):
        paths = write_synthetic(data_dir, seed=0)
        train_sentencepiece([paths["tokenizer_corpus"]], data_dir / "sp", vocab_size=64)
    return model


def prepare_work(args) -> tuple[Path, Path, Path, dict]:
    """The set-up of this script, ppo_vs_trl.py and grpo_vs_trl.py: --work-dir (created), the
    task's data and tokenizer in --data-dir (default <work-dir>/data) and the children's
    environment with --threads OpenMP/MKL threads. Returns (work dir, data dir, sp.model,
    environment)."""
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "data"
    tokenizer = prepare_data(data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return work, data_dir, tokenizer, env


def train_sft(run: Path, steps: int, data_dir: Path, tokenizer: Path, log: Path, env: dict) -> Path:
    """A short SFT policy (examples/sft_tiny.yaml) in `run`, kept when it already has a checkpoint."""
    if (run / "checkpoints" / "latest").is_file():
        print(f"[setup] sft: {run}", flush=True)
        return run
    print(f"[setup] training sft: {steps} steps -> {run}", flush=True)
    cmd = [sys.executable, "-m", "megarlhf", "sft", "--config", STAGES["sft"][0], f"data.tokenizer={tokenizer}",
           f"data.train_file={data_dir / 'sft.jsonl'}", "data.eval_file=", "train.eval_steps=0", "train.save_steps=0",
           f"train.run_dir={run}", f"train.max_steps={steps}"]  # fmt: skip
    run_logged(cmd, log, env)
    return run


def export_hf(run: Path, out: Path, pad_id: int, log: Path, env: dict) -> None:
    """megarlhf checkpoint -> HF folder (a reward model's value head is HF's score layer)."""
    cmd = [sys.executable, "tools/convert_megatron_to_hf.py", str(run), str(out), "--pad-token-id", str(pad_id)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"error: exporting {run} to {out} exited {proc.returncode}; see {log}:\n{proc.stderr[-2000:]}")


def id_text(ids) -> str:
    """Token ids as the text TRL's placeholder tokenizer encodes back to them (tools/bench/trl_sft_rm_dpo.py)."""
    return "".join(f"<id{int(i)}>" for i in ids)


def split_pair(item: dict) -> dict:
    """A tokenized preference pair -> {"prompt", "chosen", "rejected"} id text, cut where the
    loss mask starts (the prompt, assistant marker included, is common to both sides)."""
    cut = int(item["chosen_mask"].nonzero()[0])
    prompt, chosen, rejected = item["chosen_ids"][:cut], item["chosen_ids"][cut:], item["rejected_ids"][cut:]
    if not (item["rejected_ids"][:cut].equal(prompt) and item["rejected_mask"][:cut].sum() == 0):
        raise ValueError(f"chosen and rejected sequences do not share the {cut}-token prompt")
    return {"prompt": id_text(prompt), "chosen": id_text(chosen), "rejected": id_text(rejected)}


def write_trl_jsonl(stage: str, cfg, out: Path) -> int:
    """megarlhf's tokenization of the training file, as TRL's columns; returns rows."""
    from megarlhf.data import PreferenceDataset, SFTDataset
    from megarlhf.data.template import tokenizer_and_template

    d = cfg.data
    tok, template = tokenizer_and_template(d)
    dataset_cls = SFTDataset if stage == "sft" else PreferenceDataset
    data = dataset_cls(d.train_file, tok, template, d.max_length, truncation=d.truncation, on_error=d.on_error,
                       columns=d.columns())
    with open(out, "w", encoding="utf-8") as f:
        for it in data:
            if stage == "sft":
                row = {"input_ids": it["input_ids"].tolist(), "completion_mask": it["loss_mask"].int().tolist()}
            elif stage == "rm":
                row = {"chosen_ids": it["chosen_ids"].tolist(), "rejected_ids": it["rejected_ids"].tolist()}
            else:
                row = split_pair(it)
            f.write(json.dumps(row) + "\n")
    return len(data)


def summarize(rows: list[dict], warmup: int) -> dict:
    """Per-step {"tokens", "seconds"} -> median of per-step rates and total tokens / total time."""
    timed = rows[warmup:]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    return {
        "timed_steps": len(timed), "tokens": tokens, "seconds": seconds,
        "median_tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in timed),
        "total_tokens_per_second": tokens / seconds,
    }  # fmt: skip


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes, from /proc/stat over `seconds` (Linux; else the
    1-minute load average, which lags and so also counts the previous run of this tool)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # (idle + iowait, total)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return os.getloadavg()[0]
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def check_idle(threads: int, what: str) -> float:
    """Warns when the run would share cores: figures then mean little, since an OpenMP thread
    waiting for a busy core can make a step tens of times slower. Returns the busy cores."""
    busy = busy_cores()
    if busy + threads > (os.cpu_count() or 1) + 0.25:
        print(f"warning: {busy:.1f} cores busy before {what}, {threads} threads on {os.cpu_count()} cores: "
              "other processes share the CPU; rerun on an idle machine", file=sys.stderr)  # fmt: skip
    return busy


def run_logged(cmd: list[str], log: Path, env: dict) -> tuple[str, float]:
    """Run `cmd` in the repo root, stderr to `log`; returns (stdout, the child's peak RSS in
    MiB: ru_maxrss from os.wait4); exits with the log's tail on failure."""
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {proc.returncode}; last lines of {log}:\n{tail}")
    return stdout, usage.ru_maxrss / 1024  # KiB on Linux


def run_megarlhf(stage: str, overrides: list[str], run_dir: Path, log: Path, env: dict, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "megarlhf", stage, "--config", STAGES[stage][0], *overrides]
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    _, rss = run_logged(cmd, log, env)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = sorted((json.loads(line) for line in lines), key=lambda r: r["step"])
    rows = [
        {"tokens": r["tokens_per_second"] * r["step_seconds"], "seconds": r["step_seconds"],
         "computed_tokens": r["computed_tokens"]}
        for r in steps if "step_seconds" in r
    ]  # fmt: skip
    timed = rows[warmup:]
    return {**summarize(rows, warmup), "steps": len(rows), "per_step": rows, "peak_rss_mib": rss,
            "positions": sum(r["computed_tokens"] for r in timed)}  # fmt: skip


def run_trl(stage: str, cfg, data: Path, args, log: Path, env: dict, policy: Path | None = None) -> dict:
    from megarlhf.data import load_tokenizer

    m, tok = cfg.model, load_tokenizer(cfg.data.tokenizer)
    dpo = []
    if stage == "dpo":
        dpo = ["--policy", policy, "--beta", cfg.beta, "--loss-type", cfg.loss_type, "--rpo-alpha", cfg.rpo_alpha]
        if cfg.precompute_ref_log_probs:
            dpo.append("--precompute-ref-log-probs")
    if args.trl_compile:
        dpo.append("--torch-compile")
    cmd = [
        args.trl_python, str(REPO / "tools" / "bench" / "trl_sft_rm_dpo.py"), "--stage", stage, "--data", str(data),
        "--layers", m.num_layers, "--hidden", m.hidden_size, "--heads", m.num_attention_heads,
        "--kv-heads", m.query_groups, "--ffn", m.ffn_size, "--vocab", m.padded_vocab_size,
        "--max-positions", m.max_seq_length, "--rope-theta", m.rope_theta, "--norm-eps", m.norm_eps,
        "--micro-batch-size", cfg.train.micro_batch_size, "--grad-accum", cfg.train.num_microbatches(1),
        "--lr", cfg.optim.learning_rate, "--lr-scheduler", cfg.optim.lr_scheduler_type,
        "--warmup-lr-steps", cfg.optim.warmup_steps,
        "--weight-decay", cfg.optim.weight_decay, "--max-grad-norm", cfg.optim.max_grad_norm,
        "--max-length", cfg.data.max_length, "--pad-id", tok.pad_id, "--eos-id", tok.eos_id,
        "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads, "--seed", cfg.train.seed,
        *(["--tie-embeddings"] if m.tie_embeddings else []), *dpo,
    ]  # fmt: skip
    out, rss = run_logged([str(c) for c in cmd], log, env)
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_rss_mib"] = rss
    # The step clock that, like megarlhf's, includes building the step's batches.
    r.update(median_tokens_per_second=r["wall_median_tokens_per_second"],
             total_tokens_per_second=r["wall_total_tokens_per_second"])  # fmt: skip
    return r


def bench_stage(stage: str, data_dir: Path, tokenizer: Path, args, env: dict) -> dict:
    import megarlhf.config as config_module
    from megarlhf.config import load_config

    work = Path(args.work_dir).resolve()
    run_dir = work / f"megarlhf_{stage}"
    sft = policy = None
    if stage == "dpo":  # policy and reference start from one short SFT run on both sides
        from megarlhf.data import load_tokenizer

        sft = Path(args.sft).resolve() if args.sft else work / "sft"
        train_sft(sft, args.sft_steps, data_dir, tokenizer, work / "train_sft.log", env)
        policy = work / "hf" / "sft"
        export_hf(sft, policy, load_tokenizer(tokenizer).pad_id, work / "export_sft.log", env)
    overrides = [
        f"data.tokenizer={tokenizer}", f"data.train_file={data_dir / STAGES[stage][2]}", "data.eval_file=",
        f"train.run_dir={run_dir}", f"train.max_steps={args.steps}", "train.eval_steps=0", "train.save_steps=0",
        *(["init_from="] if stage == "rm" else []),
        *([f"init_from={sft}", "ref_model_path=", "win_rate_prompts="] if stage == "dpo" else []),
        *args.overrides,
    ]  # fmt: skip
    cfg = load_config(getattr(config_module, STAGES[stage][1]), REPO / STAGES[stage][0], overrides)
    m = cfg.model
    if m.arch != "llama" or cfg.layout.tp * cfg.layout.pp != 1 or m.recompute != "none" or m.add_qkv_bias:
        sys.exit(
            f"error: {STAGES[stage][0]}: the TRL twin is a Llama without QKV bias or recompute on one process; "
            "need model.arch=llama, add_qkv_bias=false, recompute=none, layout.tp=layout.pp=1"
        )
    if stage == "dpo" and cfg.label_smoothing:
        sys.exit(f"error: {STAGES[stage][0]}: the comparison maps beta, loss_type and rpo_alpha; "
                 "need label_smoothing=0")  # fmt: skip
    trl_data = work / f"trl_{stage}.jsonl"
    rows = write_trl_jsonl(stage, cfg, trl_data)
    print(f"[{stage}] megarlhf: {args.steps} steps ...", flush=True)
    busy = check_idle(args.threads, f"megarlhf {stage}")
    ours = run_megarlhf(stage, overrides, run_dir, work / f"megarlhf_{stage}.log", env, args.warmup)
    ours.update(busy_cores=busy, parameters=cfg.model.num_parameters("value" if stage == "rm" else "lm"))
    print(f"[{stage}] TRL: {args.steps} steps ...", flush=True)
    busy = check_idle(args.threads, f"TRL {stage}")
    trl = run_trl(stage, cfg, trl_data, args, work / f"trl_{stage}.log", env, policy)
    trl["busy_cores"] = busy
    seqs_per_step = cfg.train.global_batch_size * (2 if stage in PAIRED else 1)
    return {
        "megarlhf": ours, "trl": trl, "samples": rows, "sequences_per_step": seqs_per_step,
        "ratio_median": ours["median_tokens_per_second"] / trl["median_tokens_per_second"],
        "ratio_total": ours["total_tokens_per_second"] / trl["total_tokens_per_second"],
        "config": {
            "model": {**vars(cfg.model), "ffn_size": cfg.model.ffn_size, "query_groups": cfg.model.query_groups,
                      "padded_vocab_size": cfg.model.padded_vocab_size},
            "micro_batch_size": cfg.train.micro_batch_size, "global_batch_size": cfg.train.global_batch_size,
            "max_length": cfg.data.max_length, "lr": cfg.optim.learning_rate, "compile": cfg.train.compile,
            "lr_scheduler": cfg.optim.lr_scheduler_type,
            **({"dpo": {"beta": cfg.beta, "loss_type": cfg.loss_type, "rpo_alpha": cfg.rpo_alpha, "sft": str(sft),
                      "precompute_ref_log_probs": cfg.precompute_ref_log_probs}}
               if stage == "dpo" else {}),
        },
    }  # fmt: skip


def print_table(results: dict, args) -> None:
    head = f"{'stage':<6}{'figure':<16}{'megarlhf tok/s':>15}{'TRL tok/s':>12}{'ratio':>8}"
    head += f"{'TRL compute-only':>18}{'ratio':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for stage, r in results.items():
        ours, trl = r["megarlhf"], r["trl"]
        for label, key in (("median of steps", "median"), ("total / time", "total")):
            a, b = ours[f"{key}_tokens_per_second"], trl[f"{key}_tokens_per_second"]
            c = trl[f"compute_{key}_tokens_per_second"]
            print(f"{stage:<6}{label:<16}{a:>15.0f}{b:>12.0f}{a / b:>7.2f}x{c:>18.0f}{a / c:>7.2f}x")
    print()
    for stage, r in results.items():
        ours, trl, m, c = r["megarlhf"], r["trl"], r["config"]["model"], r["config"]
        print(
            f"{stage}: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads / "
            f"{m['query_groups']} KV, ffn {m['ffn_size']}, vocab {m['padded_vocab_size']}; parameters megarlhf "
            f"{ours['parameters']:,} / TRL {trl['parameters']:,}\n"
            f"    batch {c['global_batch_size']} = {c['micro_batch_size']} x "
            f"{c['global_batch_size'] // c['micro_batch_size']} ({r['sequences_per_step']} sequences/step) "
            f"from {r['samples']} samples; non-pad share of computed positions: megarlhf "
            f"{ours['tokens'] / ours['positions']:.0%} (pads each microbatch to its longest sample, samples grouped by length), "
            f"TRL {trl['tokens'] / trl['positions']:.0%} (pads to the batch's longest)\n"
            f"    cores busy with other work just before the runs: megarlhf {ours['busy_cores']:.1f}, "
            f"TRL {trl['busy_cores']:.1f}; peak RSS megarlhf {ours['peak_rss_mib']:.0f} MiB, "
            f"TRL {trl['peak_rss_mib']:.0f} MiB"
        )
        if "dpo" in c:
            d = c["dpo"]
            print(f"    DPO: beta {d['beta']}, loss_type {d['loss_type']}, rpo_alpha {d['rpo_alpha']}, policy and "
                  f"reference from {d['sft']}; lr {c['lr']} {c['lr_scheduler']}; reference log-probs "
                  f"{'precomputed before the first step' if d['precompute_ref_log_probs'] else 'in every step'}")  # fmt: skip
    first = next(iter(results.values()))
    v = first["trl"]["versions"]
    print(
        f"steps {args.steps} per side, first {args.warmup} skipped; {args.threads} threads; float32 CPU; "
        f"TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']} (TRL side); "
        f"torch.compile: megarlhf {'on' if first['config']['compile'] else 'off'}, "
        f"TRL {'on' if args.trl_compile else 'off'}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    _, data_dir, tokenizer, env = prepare_work(args)
    results = {stage: bench_stage(stage, data_dir, tokenizer, args, env) for stage in args.stages}
    print_table(results, args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"settings": settings, "stages": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
