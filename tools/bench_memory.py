#!/usr/bin/env python
"""Moved to tools/bench/memory_vs_plan.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "memory_vs_plan.py")
print(f"note: tools/bench_memory.py moved to tools/bench/memory_vs_plan.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
