"""Reading and tokenizing a large data file in each format: seconds and peak RSS.

Writes N synthetic SFT rows (the sorting task's prompts, with longer filler text) as JSONL,
a JSON array, Parquet and a datasets.save_to_disk folder, then for each format runs a
fresh child that builds the SFTDataset (what a trainer does at start) and reports:
  - seconds to read + tokenize (the child's wall time of that call alone),
  - peak RSS of the child, and its RSS before the call (imports, tokenizer),
  - for comparison, "eager": the whole file as Python objects first (json.loads of every
    line / pyarrow read_table().to_pylist()), the pattern the row readers avoid.

  python tools/bench_data.py --rows 100000 [--work /tmp/bench_data] [--json out.json]
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

REPO = Path(__file__).resolve().parent.parent
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


def child(fmt: str, path: str, tokenizer: str, eager: bool) -> None:
    """Build the dataset in this process; print one JSON line of figures."""
    from megarlhf.data import ChatTemplate, SFTDataset, load_tokenizer

    tok = load_tokenizer(tokenizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if eager:  # what the readers avoid: the whole file as Python objects, then tokenize
        if fmt == "parquet":
            import pyarrow.parquet as pq

            objs = pq.read_table(path).to_pylist()
        else:
            objs = [json.loads(line) for line in open(path)]
        template = ChatTemplate()
        items = [template.render(tok, [{"role": "user", "content": o["prompt"]},
                                       {"role": "assistant", "content": o["response"]}]) for o in objs]  # fmt: skip
        n = len(items)
    else:
        n = len(SFTDataset(path, tok, ChatTemplate(), max_length=256))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"format": fmt + (" (eager)" if eager else ""), "samples": n, "seconds": round(seconds, 2),
                      "rss_before_mib": round(before), "peak_rss_mib": round(peak)}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--work", default="/tmp/bench_data")
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fmt, path, tokenizer, eager = args.child
        child(fmt, path, tokenizer, eager == "1")
        return
    paths = write_data(Path(args.work), args.rows)
    runs = [(f, False) for f in FORMATS] + [("jsonl", True), ("parquet", True)]
    results = []
    for fmt, eager in runs:
        cmd = [sys.executable, __file__, "--child", fmt, str(paths[fmt]), str(paths["tokenizer"]), str(int(eager))]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['format']:<22} {r['samples']:>8} samples  {r['seconds']:>7.2f} s  "
              f"peak RSS {r['peak_rss_mib']:>6} MiB (before: {r['rss_before_mib']} MiB)", flush=True)  # fmt: skip
    size = {f: sum(q.stat().st_size for q in ([paths[f]] if paths[f].is_file() else paths[f].rglob("*")))
            for f in FORMATS}  # fmt: skip
    print("file sizes (MiB): " + ", ".join(f"{f} {s / 2**20:.1f}" for f, s in size.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "results": results, "bytes": size}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
