#!/usr/bin/env python
"""Moved to tools/bench/trl_grpo.py (benchmarks live in tools/bench/); this old path still runs it."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "trl_grpo.py")
print(f"note: tools/trl_grpo_baseline.py moved to tools/bench/trl_grpo.py", file=sys.stderr)
os.execv(sys.executable, [sys.executable, new, *sys.argv[1:]])
