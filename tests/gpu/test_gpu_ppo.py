"""On a GPU: PPO's offload flags free device memory between phases and change nothing else.

Runs the tiny PPO update of tests/parallel/test_ppo_equivalence.py twice on one GPU rank,
with and without offload_optimizer / offload_frozen, and compares the resulting actor.
"""

import pytest
import torch

from tests.parallel.harness import World
from tests.parallel.test_ppo_equivalence import make_assets, ppo_update_case


def _update_with_memory(root, run_dir, overrides):
    out = ppo_update_case(root, run_dir, overrides)
    out["allocated_after"] = torch.cuda.memory_allocated()
    return out


def test_offload_flags_free_memory_and_keep_results(tmp_path):
    world = World(1)
    try:
        world.run(make_assets, str(tmp_path))
        plain = world.run(_update_with_memory, str(tmp_path), str(tmp_path / "plain"), [])[0]
        offloaded = world.run(
            _update_with_memory, str(tmp_path), str(tmp_path / "off"), ["offload_optimizer=true", "offload_frozen=true"]
        )[0]
    finally:
        world.close()
    diff = max((plain["actor"][k] - offloaded["actor"][k]).abs().max().item() for k in plain["actor"])
    assert diff == pytest.approx(0.0, abs=1e-6)
    assert offloaded["allocated_after"] < plain["allocated_after"]
