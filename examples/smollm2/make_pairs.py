"""DPO pairs from the model's own samples, ranked by a rule: `megarlhf generate --n K` output -> JSONL.

    megarlhf generate --model runs/smollm2/model --prompts runs/smollm2/data/math_train.jsonl \
        --n 4 --reward gsm8k temperature=1.0 --output runs/smollm2/data/samples.jsonl
    python examples/smollm2/make_pairs.py --prompts runs/smollm2/data/math_train.jsonl \
        --samples runs/smollm2/data/samples.jsonl --out runs/smollm2/data/pairs_train.jsonl

For every prompt with at least one sample scoring above the others, writes
{"prompt": <the prompt file's prompt (messages)>, "chosen": best response, "rejected": worst
response} (up to --pairs-per-prompt pairs: best samples against worst, distinct texts). Prompts
whose samples all scored the same carry no preference and are skipped (counted).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_pairs(prompt_rows: list[dict], samples: list[dict], pairs_per_prompt: int = 1) -> tuple[list[dict], dict]:
    """Pairs (chosen = a top-scoring sample, rejected = a bottom-scoring one) per prompt.

    prompt_rows: the prompt file's rows in order (row k is file line k + 1);
    samples: `megarlhf generate` output rows (line, sample, response, score).
    Returns (pairs, counts) with counts of prompts seen, prompts without a preference, pairs."""
    by_line: dict[int, list[dict]] = {}
    for s in samples:
        if "score" not in s:
            raise SystemExit(f"sample of line {s.get('line')} has no score: run megarlhf generate with --reward")
        by_line.setdefault(int(s["line"]), []).append(s)
    pairs, tied = [], 0
    for line, group in sorted(by_line.items()):
        ranked = sorted(group, key=lambda s: (-s["score"], s["sample"]))
        best, worst = ranked[0]["score"], ranked[-1]["score"]
        if best == worst:
            tied += 1
            continue
        top = [s for s in ranked if s["score"] == best]
        bottom = [s for s in reversed(ranked) if s["score"] == worst]
        made = 0
        for c, r in zip(top, bottom):
            if made == pairs_per_prompt or c["response"] == r["response"]:
                continue
            pairs.append({"prompt": prompt_rows[line - 1]["prompt"], "chosen": c["response"], "rejected": r["response"]})
            made += 1
    return pairs, {"prompts": len(by_line), "no_preference": tied, "pairs": len(pairs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, help="the prompt file given to megarlhf generate (JSONL)")
    ap.add_argument("--samples", required=True, help="megarlhf generate --n K --reward RULE output (JSONL)")
    ap.add_argument("--out", required=True, help="pairs JSONL for megarlhf dpo")
    ap.add_argument("--pairs-per-prompt", type=int, default=1)
    args = ap.parse_args(argv)
    rows = [json.loads(x) for x in Path(args.prompts).read_text().splitlines() if x.strip()]
    samples = [json.loads(x) for x in Path(args.samples).read_text().splitlines() if x.strip()]
    pairs, counts = build_pairs(rows, samples, args.pairs_per_prompt)
    if not pairs:
        raise SystemExit(f"no pairs: all {counts['prompts']} prompts' samples scored the same; sample more (--n) or more prompts")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"make_pairs: {counts['pairs']} pairs from {counts['prompts']} prompts "
          f"({counts['no_preference']} without a preference); wrote {args.out}")  # fmt: skip
    return counts


if __name__ == "__main__":
    main()
