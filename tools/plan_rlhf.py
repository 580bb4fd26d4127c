#!/usr/bin/env python
"""Plan an RLHF run: per-GPU memory by role with a fits verdict, seconds per phase, and
the fastest megarlhf layout that fits (same as `megarlhf plan`).

    python tools/plan_rlhf.py --model llama3-70b --gpu H100 --nodes 8            # search
    python tools/plan_rlhf.py --model llama3-8b --nodes 1 --actor tp2 --generation-tp 1
    python tools/plan_rlhf.py --calibrate                                           # vs NeMo-Aligner / OpenRLHF
    python tools/plan_rlhf.py --model llama3-70b --nodes 8 --json

The model is megarlhf/plan/ (pure Python); tools/bench/memory_vs_plan.py measures the memory side.
"""

from megarlhf.plan.command import main

if __name__ == "__main__":
    raise SystemExit(main())
