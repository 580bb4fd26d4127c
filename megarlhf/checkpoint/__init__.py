"""Checkpoints: Megatron dist_checkpointing layout, resume, HF mapping. Layer: checkpoint/."""
