"""Stop a diverging run before it costs anything it had. Layer: trainers/.

The engine (engine/engine.py) refuses to apply a step whose loss or gradient norm is not
finite and records it; `NonFiniteGuard.after_step` (called by every trainer's loop after
each step) logs those records with the trainer's step and stops the run with
`TrainingDiverged` (exit code 4) after `train.max_skipped_steps` skips in a row of one
trained model. The message names the first skipped step of the streak and the newest
checkpoint, which is finite: `save_checkpoint` refuses non-finite weights, so the
rotation (`save_total_limit`) only ever removes older finite ones.

    self.guard = NonFiniteGuard(cfg.train.max_skipped_steps, cfg.train.run_dir)
    ...
    self.guard.after_step(self.step, {"actor": self.actor, "critic": self.critic}, run)   # in fit()
"""

from __future__ import annotations

from typing import Any

from megarlhf.checkpoint.dist_ckpt import CheckpointError, resolve_checkpoint
from megarlhf.config.errors import TrainingDiverged
from megarlhf.trainers.run import RunDir


class NonFiniteGuard:
    def __init__(self, max_skipped_steps: int, run_dir: str):
        self.max_skipped_steps = max_skipped_steps
        self.run_dir = run_dir
        self.skipped = 0
        """Optimizer steps skipped in this process, all trained models together."""
        self.first_bad: dict[str, int] = {}
        """Per trained model: the trainer step where its current streak of skips began."""

    def after_step(self, step: int, engines: dict[str, Any], run: RunDir) -> None:
        """Log the skips of `step` (1-based, just done); raise TrainingDiverged when a
        model has skipped `max_skipped_steps` optimizer steps in a row. Same on every rank
        (the engines decide on all-reduced values)."""
        for role, engine in engines.items():
            for line in engine.skips:
                self.skipped += 1
                run.say(f"step {step}: {role} optimizer step skipped, not applied: {line}")
            engine.skips.clear()
            if engine.consecutive_skips == 0:
                self.first_bad.pop(role, None)
                continue
            self.first_bad.setdefault(role, step)
            if engine.consecutive_skips >= self.max_skipped_steps:
                raise TrainingDiverged(self._message(role, engine.consecutive_skips))

    def _message(self, role: str, count: int) -> str:
        try:
            last = f"the last finite checkpoint is {resolve_checkpoint(self.run_dir)} (continue from it with --resume auto, e.g. with a lower optim.learning_rate)"
        except CheckpointError:
            last = f"no checkpoint was written under {self.run_dir} yet"
        return (
            f"training diverged: {count} {role} optimizer steps in a row had a non-finite loss or gradient "
            f"norm (train.max_skipped_steps = {self.max_skipped_steps}), the first at step {self.first_bad[role]}; "
            f"nothing non-finite was applied or saved; {last}"
        )


def checkpoint_bytes(engines: dict[str, Any]) -> float:
    """Expected size of one checkpoint of `engines`: weights + Adam states of each trained
    model, unsharded (the planner's model_states at TP = PP = DP = 1, without the grads,
    which are not saved)."""
    from megarlhf.plan.memory import model_states

    total = 0.0
    for engine in engines.values():
        model = engine.module
        states = model_states(model.megarlhf_config, 1, 1, 1, head=model.megarlhf_head, trainable=True)
        total += states.weights + states.optimizer
    return total


def warn_if_disk_short(run_dir: str, engines: dict[str, Any], run: RunDir) -> None:
    """At start: one checkpoint's expected size vs the free space of run_dir's filesystem;
    a warning naming both when one more checkpoint would not fit (older ones are only
    removed after the new one is complete, so their space does not count)."""
    import shutil
    from pathlib import Path

    from megarlhf.checkpoint.dist_ckpt import human_bytes

    need = checkpoint_bytes(engines)
    path = Path(run_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        run.say(
            f"warning: one checkpoint needs about {human_bytes(need)} but the filesystem of {run_dir} has "
            f"{human_bytes(free)} free: the first save will fail (train.on_save_error decides what happens then)"
        )
