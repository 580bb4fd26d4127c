#!/usr/bin/env python
"""Moved to tools/bench/forward_backward.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "forward_backward.py")
print(f"note: tools/bench_forward_backward.py moved to tools/bench/forward_backward.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
