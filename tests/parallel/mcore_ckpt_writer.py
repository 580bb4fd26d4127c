"""Writes a training checkpoint under whatever Megatron-Core this Python has, for
test_mcore_compat's cross-release resume test (which runs this module with the Python
3.11 / megatron-core 0.16.1 interpreter as a subprocess):

    python -m tests.parallel.mcore_ckpt_writer RUN_DIR

A TP2 actor takes one optimizer step, is checkpointed, then takes a second step; the
second step's loss and the parameters after it go to RUN_DIR/expected.pt. A resume from
the checkpoint (under another release) must reproduce that second step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megarlhf.checkpoint.dist_ckpt import save_checkpoint
from megarlhf.config import OptimConfig
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import weights
from tests.parallel.common import batch, groups, reseed, tiny_config

LAYOUT = (2, 1)  # TP2: sharded weights and optimizer state on both ranks


def nll_loss(output, mb, tp_group):
    lp, _ = logprobs_and_entropy(output[:, :-1], mb["tokens"][:, 1:], tp_group=tp_group, vocab_size=250)
    mask = mb["mask"][:, 1:]
    nll = -(lp * mask).sum()
    return nll / mask.sum(), {"nll": nll.detach()}


def engine(seed: int) -> TrainEngine:
    g = groups(*LAYOUT)
    reseed(seed, g)
    return TrainEngine(build_model(tiny_config("llama"), g, "lm"), g, OptimConfig(learning_rate=1e-3), max_steps=4)


def step(eng: TrainEngine, seed: int) -> dict[str, float]:
    return eng.train_step([batch(b=4, seed=seed)], lambda out, mb: nll_loss(out, mb, eng.groups.tp))


def write_case(run_dir: str) -> dict:
    from megarlhf.parallel import compat

    eng = engine(seed=21)
    step(eng, seed=1)
    save_checkpoint(run_dir, 1, {"actor": eng}, {"writer": compat.version_string()}, keep=1)
    second = step(eng, seed=2)
    return {
        "megatron_core": compat.version_string(),
        "nll": second["nll"],
        "params": weights.gather_full_state(eng.module, eng.groups),
    }


def main(run_dir: str) -> None:
    from tests.parallel.harness import World

    world = World(2)
    try:
        result = world.run(write_case, run_dir)[0]
    finally:
        world.close()
    torch.save(result, Path(run_dir) / "expected.pt")


if __name__ == "__main__":
    main(sys.argv[1])
