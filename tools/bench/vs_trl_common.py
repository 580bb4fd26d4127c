"""What tools/bench/grpo_vs_trl.py and tools/bench/ppo_vs_trl.py share: their common command-line
arguments, running megarlhf and the TRL baseline as measured children, megarlhf's
per-iteration figures from metrics.jsonl, the printed table and the --json file.

Imported from those scripts' folder (tools/bench/); megarlhf is imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from sft_rm_dpo_vs_trl import check_idle, check_trl_python

REPO = Path(__file__).resolve().parents[2]
PHASES = ("generate", "score", "advantages", "train", "refit")  # megarlhf's time/<phase> of an iteration

# Rows of the side-by-side table, (label, key, format): seconds per iteration first, then
# tokens, memory and optimizer steps; grpo_vs_trl.py puts sequences/s between the two.
SECONDS_ROWS = [
    ("seconds / iteration (mean)", "seconds_per_iteration", "{:.2f}"),
    ("seconds / iteration (median)", "median_seconds_per_iteration", "{:.2f}"),
]
TOKENS_ROWS = [
    ("generated tokens / iteration", "generated_per_iteration", "{:.0f}"),
    ("trained tokens / iteration", "trained_per_iteration", "{:.0f}"),
    ("tokens/s (median of iterations)", "median_tokens_per_second", "{:.0f}"),
    ("tokens/s (total / time)", "total_tokens_per_second", "{:.0f}"),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    ("optimizer steps / iteration", "optimizer_steps_per_iteration", "{:.0f}"),
]


# --- command line ------------------------------------------------------------------------
def iteration_parser(doc: str, algo: str, work_dir_help: str) -> argparse.ArgumentParser:
    """The parser of bench_<algo>.py with the arguments it opens with (--iterations ..
    --sft); the script adds its own, then calls parse_iteration_args."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10, help=f"{algo.upper()} iterations per side (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the figures (default 2)")
    p.add_argument("--work-dir", default=f"runs/bench_{algo}", help=work_dir_help)
    p.add_argument("--data-dir", default=None, help="task data + sp.model; default <work-dir>/data, built if missing")
    p.add_argument("--sft", default=None, help="megarlhf SFT run to start from (default: <work-dir>/sft, trained if missing)")
    return p


def parse_iteration_args(
    p: argparse.ArgumentParser, argv, yaml: str, trl_python: str, trl_python_help: str, trl_imports: str
):
    """Adds the arguments both benchmarks end with (--set .. --json), parses `argv`,
    checks that --iterations exceeds --warmup and, unless --skip-trl, that --trl-python
    runs `trl_imports` (the TRL side's imports): a missing package then stops the
    benchmark before megarlhf's runs, not after them."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"further override of {yaml} (repeatable); the TRL side follows the mapped fields")
    p.add_argument("--trl-python", default=trl_python, help=trl_python_help)
    p.add_argument("--skip-trl", action="store_true", help="run only megarlhf")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (OMP_NUM_THREADS)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run megarlhf then TRL this many times, each in fresh processes; the table shows the "
                        "round with the median ratio, a line lists every round (default 1; 3+ on a noisy machine)")
    p.add_argument("--json", default=None, help="also write settings and figures to this file")
    args = p.parse_args(argv)  # fmt: skip
    if args.iterations <= args.warmup:
        p.error(f"--iterations {args.iterations} must exceed --warmup {args.warmup}")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    if not args.skip_trl:
        check_trl_python(p, args.trl_python, trl_imports, f"it must be the {trl_python_help} (or pass --skip-trl)")
    return args


def exit_if_unmapped(cfg, checks: list[tuple[bool, str]], what: str) -> None:
    """Exits when `cfg` has settings the TRL side cannot mirror: the model and layout
    checks both benchmarks make, then `checks`, (wrong, what to set) pairs. The message
    is "error: <what>; need <what to set>; ..."."""
    unmapped = [
        (cfg.model.arch != "llama" or cfg.model.add_qkv_bias, "model.arch=llama without q/k/v bias"),
        (cfg.layout.tp * cfg.layout.pp != 1 or cfg.model.recompute != "none", "layout.tp=pp=1, model.recompute=none"),
        *checks,
    ]  # fmt: skip
    bad = [need for wrong, need in unmapped if wrong]
    if bad:
        sys.exit(f"error: {what}; need " + "; ".join(bad))


# --- running -------------------------------------------------------------------------------
def run_measured(cmd: list[str], log: Path, env: dict) -> float:
    """Run `cmd` in the repo root, stdout and stderr to `log`; returns the child's peak RSS
    in MiB (ru_maxrss from os.wait4: that process and the children it waited for)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {proc.returncode}; last lines of {log}:\n{tail}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def measure_both_sides(algo: str, args, run_megarlhf, run_trl) -> tuple[dict, dict | None]:
    """--rounds times: run_megarlhf(), then run_trl() unless --skip-trl, each after
    announcing it and checking that the machine is idle; each side's figures get the busy
    cores seen before it. Returns the round with the median iteration-throughput ratio
    (TRL's seconds per iteration / megarlhf's; without TRL, megarlhf's seconds per
    iteration), the lower median of an even count; with several rounds, megarlhf's figures
    also hold "rounds": every round's seconds per iteration, ratio and peak RSS."""
    rounds = []
    for r in range(args.rounds):
        of = f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""
        print(f"[{algo}] megarlhf: {args.iterations} iterations{of} ...", flush=True)
        busy = check_idle(args.threads, f"megarlhf {algo}")
        ours = run_megarlhf()
        ours["busy_cores"] = busy
        trl = None
        if not args.skip_trl:
            print(f"[{algo}] TRL: {args.iterations} iterations{of} ...", flush=True)
            busy = check_idle(args.threads, f"TRL {algo}")
            trl = run_trl()
            trl["busy_cores"] = busy
        rounds.append((ours, trl))
    if len(rounds) == 1:
        return rounds[0]
    summary = [round_summary(ours, trl) for ours, trl in rounds]
    speed = [s.get("iteration_throughput_ratio", 1 / s["megarlhf_seconds_per_iteration"]) for s in summary]
    pick = sorted(range(len(rounds)), key=speed.__getitem__)[(len(rounds) - 1) // 2]
    ours, trl = rounds[pick]
    ours["rounds"] = summary
    ours["round_shown"] = pick + 1
    return ours, trl


def round_summary(ours: dict, trl: dict | None) -> dict:
    """One round's headline figures (see measure_both_sides)."""
    out = {"megarlhf_seconds_per_iteration": ours["seconds_per_iteration"], "megarlhf_peak_rss_mib": ours["peak_rss_mib"]}
    if trl:
        out.update(
            trl_seconds_per_iteration=trl["seconds_per_iteration"], trl_peak_rss_mib=trl["peak_rss_mib"],
            iteration_throughput_ratio=trl["seconds_per_iteration"] / ours["seconds_per_iteration"],
        )  # fmt: skip
    return out


def run_megarlhf_iterations(algo: str, yaml: str, cfg, overrides: list[str], work: Path, env: dict):
    """Runs `python -m megarlhf <algo> --config <yaml> <overrides>` afresh (cfg's run
    directory is removed first: no resume; log <work>/megarlhf_<algo>.log). Returns its
    metrics.jsonl iteration rows and its peak RSS in MiB."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists():  # a fresh run: no resume, metrics.jsonl from this run only
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "megarlhf", algo, "--config", yaml, *overrides]
    rss = run_measured(cmd, work / f"megarlhf_{algo}.log", env)
    return read_metrics(run_dir), rss


def read_metrics(run_dir: Path) -> list[dict]:
    """The iteration rows of a run's metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if "time/iteration" in r), key=lambda r: r["step"])


def write_prompts(cfg, out: Path, to_row) -> int:
    """Writes megarlhf's tokenization of the training prompts (its chat template) to `out`
    as JSONL, one `to_row(item)` per prompt of its PromptDataset; returns the prompts."""
    from megarlhf.data import PromptDataset
    from megarlhf.data.template import tokenizer_and_template

    d = cfg.data
    data = PromptDataset(d.train_file, *tokenizer_and_template(d), d.max_length,
                         truncation=d.truncation, on_error=d.on_error, columns=d.columns())  # fmt: skip
    with open(out, "w", encoding="utf-8") as f:
        for it in data:
            f.write(json.dumps(to_row(it)) + "\n")
    return len(data)


def run_trl_baseline(cmd: list, log: Path, env: dict) -> dict:
    """Runs a tools/trl_*_baseline.py command (its arguments turned into strings; output to
    `log`); returns the JSON object it printed last, with peak_rss_mib_wait4 added."""
    rss = run_measured([str(c) for c in cmd], log, env)
    r = json.loads(log.read_text().strip().splitlines()[-1])
    r["peak_rss_mib_wait4"] = rss
    return r


# --- figures -------------------------------------------------------------------------------
def megarlhf_iterations(rows: list[dict], extra: dict[str, str] | None = None) -> list[dict]:
    """metrics.jsonl iteration rows -> per-iteration figures: seconds, tokens, response
    length, the seconds since the previous row (loop_seconds, None for the first) and each
    phase's seconds; `extra` maps further figure names to the metric each is read from."""
    extra = extra or {}
    return [
        {"seconds": r["time/iteration"], "generated": r["tokens/generated"], "trained": r["tokens/trained"],
         "tokens": r["tokens/generated"] + r["tokens/trained"], "response_length": r["response_length"],
         **{name: r[metric] for name, metric in extra.items()},
         "loop_seconds": r["time"] - prev["time"] if prev else None,
         **{p: r.get(f"time/{p}", 0.0) for p in PHASES}}
        for prev, r in zip([None, *rows[:-1]], rows)
    ]  # fmt: skip


def summarize_megarlhf(per: list[dict], warmup: int) -> dict:
    """The figures of megarlhf's iterations after the first `warmup` (from megarlhf_iterations)."""
    timed = per[warmup:]
    n, tokens, seconds = len(timed), sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    loop = [r["loop_seconds"] for r in timed if r["loop_seconds"] is not None]
    return {
        "iterations": len(per), "timed_iterations": n, "tokens": tokens, "seconds": seconds,
        "seconds_per_iteration": seconds / n,
        "median_seconds_per_iteration": statistics.median(r["seconds"] for r in timed),
        "loop_seconds_per_iteration": sum(loop) / len(loop) if loop else None,
        "generated_per_iteration": sum(r["generated"] for r in timed) / n,
        "trained_per_iteration": sum(r["trained"] for r in timed) / n,
        "median_tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in timed),
        "total_tokens_per_second": tokens / seconds,
        "phase_seconds": {p: sum(r[p] for r in timed) / n for p in PHASES},
        "per_iteration": per,
    }  # fmt: skip


# --- output --------------------------------------------------------------------------------
def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def print_figures(rows: list[tuple[str, str, str]], ours: dict, trl: dict | None) -> None:
    """The side-by-side table: (label, key, format) rows of megarlhf's figures, TRL's and the ratio."""
    head = f"{'figure':<34}{'megarlhf':>10}" + (f"{'TRL':>10}{'megarlhf/TRL':>14}" if trl else "")
    print("\n" + head + "\n" + "-" * len(head))
    for label, key, fmt in rows:
        line = f"{label:<34}{fmt.format(ours[key]):>10}"
        if trl:
            ratio = f"{ours[key] / trl[key]:>13.2f}x" if trl[key] else f"{'-':>14}"  # e.g. a mean score of 0
            line += f"{fmt.format(trl[key]):>10}{ratio}"
        print(line)


def print_phases(ours: dict, trl: dict | None, trl_score_note: str) -> None:
    """Each side's share of an iteration per phase, its generation rate and (with TRL) the
    policy's parameters; `trl_score_note` ends TRL's phase line."""
    ph, it = ours["phase_seconds"], ours["seconds_per_iteration"]
    print("\nmegarlhf per phase (% of time/iteration): " + ", ".join(f"{p} {pct(ph[p], it)}" for p in PHASES)
          + f"; seconds/iteration incl. the loop: {ours['loop_seconds_per_iteration'] or float('nan'):.2f}")  # fmt: skip
    print(f"megarlhf generation: {ours['generated_per_iteration'] / ph['generate']:.0f} generated tokens/s")
    if trl:
        tp, tit = trl["phase_seconds"], trl["seconds_per_iteration"]
        print("TRL per phase (% of iteration): " + ", ".join(f"{p} {pct(tp[p], tit)}" for p in ("generate", "score", "train"))
              + trl_score_note)  # fmt: skip
        print(f"TRL generation: {trl['generated_per_iteration'] / tp['generate']:.0f} generated tokens/s; "
              f"parameters policy {trl['parameters']['policy']:,} (megarlhf {ours['parameters']['policy']:,})")  # fmt: skip


def print_busy_and_versions(ours: dict, trl: dict | None) -> None:
    """The table's last line: cores busy before each run and, with TRL, its versions."""
    busy = f"cores busy with other work just before the runs: megarlhf {ours['busy_cores']:.1f}"
    if trl:
        v = trl["versions"]
        busy += f", TRL {trl['busy_cores']:.1f}; TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']}"
    print(busy)


def print_rounds(ours: dict, trl: dict | None) -> None:
    """With --rounds > 1: every round's seconds per iteration, peak RSS and ratio."""
    if "rounds" not in ours:
        return
    print(f"\n{len(ours['rounds'])} rounds (the table shows round {ours['round_shown']}, the median"
          + (" ratio):" if trl else "):"))
    for i, r in enumerate(ours["rounds"], 1):
        line = f"  round {i}: megarlhf {r['megarlhf_seconds_per_iteration']:.2f} s/iteration, {r['megarlhf_peak_rss_mib']:.0f} MiB"
        if trl:
            line += (f"; TRL {r['trl_seconds_per_iteration']:.2f} s/iteration, {r['trl_peak_rss_mib']:.0f} MiB; "
                     f"iteration throughput {r['iteration_throughput_ratio']:.2f}x")  # fmt: skip
        print(line)


def write_json(args, overrides: list[str], ours: dict, trl: dict | None, ratio: dict | None) -> None:
    """--json: the settings, megarlhf's overrides, both sides' figures and, when TRL ran,
    the megarlhf/TRL `ratio`s."""
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    result = {"settings": settings, "megarlhf_overrides": overrides, "megarlhf": ours, "trl": trl}
    if trl:
        result["ratio"] = ratio
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
