"""A checkpoint saved at one TP/PP layout loads at another (model weights), and the
full optimizer state round-trips at the same layout."""

from __future__ import annotations

import pytest
import torch

from megarlhf.checkpoint.dist_ckpt import load_model_weights, save_checkpoint
from megarlhf.config import OptimConfig
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.parallel import weights
from tests.parallel.common import groups, reseed, tiny_config


def reshard_case(run_dir, save_layout, load_layout, head):
    cfg = tiny_config("llama")
    src = groups(*save_layout)
    reseed(5, src)
    engine = TrainEngine(build_model(cfg, src, head), src, OptimConfig(), max_steps=1)
    with torch.no_grad():  # make every tensor distinct from a fresh init
        for p in engine.module.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    saved = weights.gather_full_state(engine.module, src)
    save_checkpoint(run_dir, 7, {"reward" if head == "value" else "actor": engine}, {}, keep=1)

    dst = groups(*load_layout)
    reseed(6, dst)
    model = build_model(cfg, dst, head)
    load_model_weights(model, dst, run_dir, "reward" if head == "value" else "actor")
    loaded = weights.gather_full_state(model, dst)
    return max((loaded[n] - saved[n]).abs().max().item() for n in saved)


@pytest.mark.parametrize(
    "save_layout,load_layout",
    [((2, 1), (1, 1)), ((1, 2), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (1, 2))],
    ids=["tp2->tp1", "pp2->tp1", "tp1->tp2", "tp2->pp2"],
)
@pytest.mark.parametrize("head", ["lm", "value"])
def test_reshard_on_load(world2, tmp_path, save_layout, load_layout, head):
    diffs = world2.run(reshard_case, str(tmp_path / "run"), save_layout, load_layout, head)
    assert max(diffs) == 0.0
