"""Reading and tokenizing a large data file in each format: seconds and peak RSS.

Writes N synthetic SFT rows (the sorting task's prompts, with longer filler text) as JSONL,
a JSON array, Parquet and a datasets.save_to_disk folder, then for each format runs a
fresh child that builds the SFTDataset (what a trainer does at start) and reports:
  - wall and CPU seconds of that call alone (imports and the tokenizer load excluded),
  - how far the call raised the child's peak RSS above its RSS before it;
for "read" (rows parsed into records, nothing kept), "dataset" (the tokenized SFTDataset a
trainer builds) and, for comparison, "eager": the whole file as Python objects (json.loads
of every line / pyarrow read_table().to_pylist()), the pattern the row readers avoid.
Linux only (/proc/self/status VmHWM, reset through /proc/self/clear_refs).

  python tools/bench/data_formats.py --rows 100000 [--work /tmp/bench_data] [--modes read,dataset,eager] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("jsonl", "json", "parquet", "save_to_disk")


def write_data(work: Path, rows: int) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megarlhf.data import train_sentencepiece

    rng = random.Random(0)
    words = "sort these digits please in ascending order and answer with the digits only".split()
    records = []
    for _ in range(rows):
        digits = [rng.randrange(10) for _ in range(rng.randrange(4, 9))]
        filler = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 60)))
        records.append({"prompt": f"{filler} sort: {' '.join(map(str, digits))}",
                        "response": " ".join(map(str, sorted(digits)))})  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    paths = {f: work / n for f, n in zip(FORMATS, ("d.jsonl", "d.json", "d.parquet", "d_ds"))}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"].write_text(json.dumps(records))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, paths["parquet"])
    datasets.Dataset(table).save_to_disk(str(paths["save_to_disk"]))
    (work / "corpus.txt").write_text("\n".join(r["prompt"] + "\n" + r["response"] for r in records[:2000]))
    paths["tokenizer"] = Path(train_sentencepiece([str(work / "corpus.txt")], str(work / "sp"), 128))
    return paths


def _hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss it does not carry the
    parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, fmt: str, path: str, tokenizer: str) -> None:
    """One measurement in this process; prints one JSON line. Modes: "read" (rows parsed
    into records, nothing kept), "dataset" (the SFTDataset a trainer builds), "eager" (the
    whole file as Python objects: json.loads of every line / pyarrow read_table().to_pylist())."""
    from megarlhf.data import ChatTemplate, SFTDataset, load_tokenizer, parse_sft
    from megarlhf.data.readers import Records

    tok = load_tokenizer(tokenizer)
    if fmt in ("parquet", "save_to_disk"):  # imports are not what is measured
        import pyarrow.parquet  # noqa: F401
    if fmt == "save_to_disk":
        import datasets  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _hwm_mib()
    t0, c0 = time.perf_counter(), _cpu()
    if mode == "read":
        n = sum(1 for _ in Records(path, parse_sft))
    elif mode == "dataset":
        n = len(SFTDataset(path, tok, ChatTemplate(), max_length=256))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        n = len(objs := pq.read_table(path).to_pylist())
    else:
        n = len(objs := [json.loads(line) for line in open(path)])  # noqa: F841
    out = {"mode": mode, "format": fmt, "samples": n, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(_cpu() - c0, 2), "rss_before_mib": round(before),
           "peak_rss_increase_mib": round(_hwm_mib() - before)}  # fmt: skip
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--work", default="/tmp/bench_data")
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument("--modes", default="read,dataset,eager", help="which measurements (comma-separated)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.work)
    paths = write_data(work, args.rows) if not (work / "sp.model").exists() else {
        **{f: work / n for f, n in zip(FORMATS, ("d.jsonl", "d.json", "d.parquet", "d_ds"))}, "tokenizer": work / "sp.model"}
    modes = args.modes.split(",")
    runs = [(m, f) for m in ("read", "dataset") if m in modes for f in FORMATS]
    runs += [("eager", f) for f in ("jsonl", "parquet") if "eager" in modes]
    results = []
    for mode, fmt in runs:
        cmd = [sys.executable, __file__, "--child", mode, fmt, str(paths[fmt]), str(paths["tokenizer"])]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        results.append(r := json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode:<8} {fmt:<13} {r['samples']:>7} rows {r['seconds']:>7.2f} s (cpu {r['cpu_seconds']:>6.2f} s)  "
              f"peak RSS +{r['peak_rss_increase_mib']:>5} MiB over {r['rss_before_mib']} MiB", flush=True)  # fmt: skip
    size = {f: sum(q.stat().st_size for q in ([paths[f]] if paths[f].is_file() else paths[f].rglob("*")))
            for f in FORMATS}  # fmt: skip
    print("file sizes (MiB): " + ", ".join(f"{f} {s / 2**20:.1f}" for f, s in size.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "results": results, "bytes": size}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
