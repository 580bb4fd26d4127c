"""The planner: memory, step time and layout search for RLHF runs (`megarlhf plan`).

Layer: plan/ (pure Python over `megarlhf.config`; no torch, so it answers in a second).
hardware.py (GPU specs), shapes.py (presets, per-rank parameters, FLOPs), memory.py
(bytes per GPU), timing.py (seconds per phase, the named efficiency factors), planner.py
(megarlhf's iteration and the search), peers.py (published peer rows and the fit),
command.py (CLI).
"""
