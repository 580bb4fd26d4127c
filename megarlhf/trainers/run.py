"""The run directory every stage writes, and its metrics log. Layer: trainers/.

    run_dir/config.yaml      the fully resolved config
    run_dir/metrics.jsonl    one JSON object per step (and per evaluation)
    run_dir/checkpoints/     iter_NNNNNNN/ + latest (see checkpoint/dist_ckpt.py)
    run_dir/logs/            rank-0 log of the printed lines
    run_dir/plots/*.png      curves of chosen metrics over steps
    run_dir/tensorboard/     the same metrics as TensorBoard events, when tensorboard is installed
    run_dir/summary.json     written at the end

Only rank 0 writes; other ranks get a `RunDir` whose writes are no-ops.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megarlhf.config import dump_yaml
from megarlhf.output import is_quiet, progress_bar


class RunDir:
    def __init__(self, path: str | Path, config: Any, *, is_main: bool, resume: bool):
        self.path = Path(path)
        self.is_main = is_main
        self._progress = None
        if not is_main:
            return
        (self.path / "logs").mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_yaml(config))
        metrics = self.path / "metrics.jsonl"
        if not resume and metrics.exists():
            metrics.unlink()  # a fresh run in an old directory starts a fresh log
        self._metrics = metrics.open("a")
        self._log = (self.path / "logs" / "train.log").open("a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self._tb = SummaryWriter(str(self.path / "tensorboard"))

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
        if not self.is_main:
            return
        self._metrics.close()
        path = self.path / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= after_step]
        path.write_text("".join(line + "\n" for line in kept))
        self._metrics = path.open("a")

    def log_metrics(self, step: int, metrics: dict[str, float], **extra: Any) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **extra}
        row.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def say(self, line: str) -> None:
        if not self.is_main:
            return
        if is_quiet():
            pass  # --quiet: the log file only
        elif self._progress is not None:
            self._progress.write(line)
        else:
            print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def progress(self, total: int, initial: int, desc: str):
        """A progress bar on rank 0 (None elsewhere); a line per 30 s in a log file (megarlhf/output.py)."""
        if not self.is_main:
            return None
        self._progress = progress_bar(total=total, initial=initial, desc=desc, leave=True)
        return self._progress

    def finished_summary(self, step: int, max_steps: int) -> dict[str, Any] | None:
        """The summary of a run resumed after it had finished (nothing left to train), so
        that resuming never overwrites it; None otherwise. Every rank reads it."""
        path = self.path / "summary.json"
        if step < max_steps or not path.exists():
            return None
        self.say(f"already finished: {step} of {max_steps} steps done; summary kept ({path})")
        return json.loads(path.read_text())

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.is_main:
            return
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def plot(self, name: str, keys: list[str], title: str) -> Path | None:
        """One panel per metric in `keys` (those present) over steps, from metrics.jsonl."""
        if not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._metrics.flush()
        rows = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines()]
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return None
        fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
        for ax, (key, points) in zip(axes[0], series.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        out = self.path / name
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._metrics.close()
        self._log.close()
        if self._tb is not None:
            self._tb.close()
