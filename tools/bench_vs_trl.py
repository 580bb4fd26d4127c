#!/usr/bin/env python
"""Moved to tools/bench/sft_rm_dpo_vs_trl.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "sft_rm_dpo_vs_trl.py")
print(f"note: tools/bench_vs_trl.py moved to tools/bench/sft_rm_dpo_vs_trl.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
