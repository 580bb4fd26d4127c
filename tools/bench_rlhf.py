#!/usr/bin/env python
"""Moved to tools/bench/rlhf_phases.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "rlhf_phases.py")
print(f"note: tools/bench_rlhf.py moved to tools/bench/rlhf_phases.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
