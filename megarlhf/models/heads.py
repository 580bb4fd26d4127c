"""Output heads. Layer: models/.

`ValueHead` replaces GPTModel's `output_layer` for the critic and the reward model: one
scalar per token. It keeps the output layer's call signature, so GPTModel's forward
(including pipeline stages and the KV-cache path) is unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig


class ValueHead(torch.nn.Module):
    """Linear(hidden, 1, bias=False) on the final hidden states, replicated on every TP rank.

    No bias, like Hugging Face's `*ForSequenceClassification` score layer, so a reward
    model or critic exports to it exactly. The Bradley-Terry loss is invariant to a
    constant shift of the scores: a bias would get only rounding noise as gradient, which
    Adam's normalisation turns into a steady drift (measured: 1.2e-4 after 100 steps).

    The hidden states entering the LM head are identical on all TP ranks (the last
    row-parallel linear all-reduced them), so a replicated head computes the same values
    and the same gradients everywhere: no TP communication is needed, except under
    sequence parallelism, where each rank holds a slice of the sequence and we gather it
    first (backward then hands each rank its slice of the gradient).
    """

    def __init__(self, config: TransformerConfig, tp_group):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = tp_group
        # `weight` directly on the module (not a nested Linear): Megatron's
        # LanguageModule.sharded_state_dict expects the key `output_layer.weight`.
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        torch.nn.init.normal_(self.weight, std=config.init_method_std)

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s, b, h] -> ([s, b, 1], None), the output layer's (output, bias) contract."""
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return torch.nn.functional.linear(hidden, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Replicated over TP (no TP axis), deduplicated over DP, like a norm weight."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {}, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
