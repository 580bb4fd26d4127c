#!/usr/bin/env python
"""Write the synthetic sorting task: SFT pairs, preference pairs and RL prompts.

    python examples/data/make_synthetic.py --out data/sort --seed 0

Prompts look like "sort: 7 2 9 4", answers like "2 4 7 9"; `megarlhf.data.synthetic.sort_reward`
grades a response. Files: sft.jsonl, prefs_train.jsonl, prefs_test.jsonl, prompts_train.jsonl,
prompts_test.jsonl (with "answer") and tokenizer_corpus.txt (for tools/train_tokenizer.py).
The same seed writes byte-identical files; test prompts never occur in training files.
"""

from __future__ import annotations

import argparse
import sys

from megarlhf.config.errors import ConfigError
from megarlhf.data.synthetic import write_synthetic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-sft", type=int, default=4000, help="SFT prompt/response pairs")
    p.add_argument("--n-pref-train", type=int, default=6000, help="training preference pairs")
    p.add_argument("--n-pref-test", type=int, default=500, help="held-out preference pairs")
    p.add_argument("--n-prompts-train", type=int, default=1000, help="RL training prompts")
    p.add_argument("--n-prompts-test", type=int, default=200, help="held-out RL prompts")
    p.add_argument("--min-len", type=int, default=3, help="fewest digits in a prompt (>= 2)")
    p.add_argument("--max-len", type=int, default=6, help="most digits in a prompt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        paths = write_synthetic(
            a.out, a.seed, a.n_sft, a.n_pref_train, a.n_pref_test, a.n_prompts_train, a.n_prompts_test,
            a.min_len, a.max_len,
        )  # fmt: skip
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        print(f"{name:>16}: {path} ({lines} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
