"""Stop at a step boundary when the scheduler asks: SIGUSR1 or SIGTERM. Layer: trainers/.

SLURM sends SIGUSR1 ahead of a job's time limit (`#SBATCH --signal=B:USR1@N`, which the
launch script forwards to every rank) and SIGTERM when it preempts or cancels a job. The
handler only sets a flag. After each step every rank calls `agreed()`: one all-reduce (MAX)
of a one-element tensor over the world, so a signal seen by any rank stops all of them
after the same step. The trainer then saves a checkpoint, writes `run_dir/logs/stopped`
and returns normally (exit code 0); after SIGUSR1 the launch script sees that file and
requeues the job, and the new run continues with `--resume auto` exactly where this one
stopped. A signal during the last step changes nothing: that run simply completes.

    self.stop = StopRequest()                        # first thing in the trainer's __init__
    ...
    stop = self.stop.agreed(self.device) and self.step < cfg.max_steps   # in fit(), after each step
    if stop or <a periodic checkpoint is due>:
        self.save()
    if stop:
        return self.stop.stopped(run, self.stage, self.step)
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from megarlhf.trainers.run import RunDir

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """A process's record of a stop signal, and the world's agreement on it."""

    def __init__(self):
        self.signal_name: str | None = None
        # Python accepts handlers only in the main thread; trainers built elsewhere (e.g. in
        # a test harness thread) simply never see a stop request.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two Python bytecodes of the main thread: only record it here; the
        # step in flight (collectives included) finishes normally.
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device | str) -> bool:
        """Collective over every rank, once per step: did any rank get a stop signal?"""
        flag = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # one float per step: the only host sync this adds

    def stopped(self, run: RunDir, stage: str, step: int) -> dict[str, Any]:
        """After the checkpoint: log the stop, leave `logs/stopped` for the launch script
        (it requeues only a run that stopped early), close the run directory (no
        summary.json: the run is not done) and return the summary fit() returns."""
        reason = self.signal_name or "a signal on another rank"
        run.say(f"{reason}: stopped after step {step} with a checkpoint; `--resume auto` continues from it")
        if run.is_main:
            (run.path / "logs" / "stopped").write_text(f"{reason} step {step}\n")
        run.close()
        return {"stage": stage, "steps": step, "stopped_by": reason}
