"""Stage trainers (sft, rm; ppo, dpo, grpo to come): one readable fit() each. Layer: trainers/."""
