#!/usr/bin/env python
"""Moved to tools/bench/generation_vs_hf.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "generation_vs_hf.py")
print(f"note: tools/bench_generation.py moved to tools/bench/generation_vs_hf.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
