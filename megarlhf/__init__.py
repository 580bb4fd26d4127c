"""megarlhf: RLHF (SFT, reward model, PPO, DPO, GRPO) on Megatron-Core.

Layer: package root. Importing it is cheap: nothing here imports Megatron-Core or
torch.distributed, so `megarlhf --help` answers fast.
"""

from megarlhf.output import filter_known_warnings

__version__ = "0.1.0"

# Before anything imports Megatron-Core: its TE/Apex fallback warnings are noise on every
# entry point (CLI, tools, library use); the one list is in megarlhf/output.py.
filter_known_warnings()
