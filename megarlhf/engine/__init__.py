"""Training engine: DDP, optimizer, Megatron's schedule and loss contract. Layer: engine/."""
