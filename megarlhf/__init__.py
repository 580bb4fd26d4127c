"""megarlhf: RLHF (SFT, reward model, PPO, DPO, GRPO) on Megatron-Core.

Layer: package root. Importing it is cheap: nothing here imports Megatron-Core or
torch.distributed, so `megarlhf --help` answers fast.
"""

__version__ = "0.1.0"
