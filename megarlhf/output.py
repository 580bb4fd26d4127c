"""What every entry point prints besides its results: known warnings, progress bars, --quiet.

Layer: package root (stdlib only; tqdm is imported when a bar is made). Imported by
`megarlhf/__init__.py`, so the CLI, the tools and library users all get the same filters
from this one place, before Megatron-Core is imported anywhere.

- `filter_known_warnings()`: Megatron-Core warns once per module when Transformer Engine or
  Apex are absent; on CPU those fallbacks are exactly what megarlhf uses (the backbone
  reports the attention it picked once), so the warnings are noise in every log.
- `progress_bar(...)`: a tqdm bar that, when its stream is not a terminal (a log file, a
  SLURM output), redraws at most every `TQDM_MININTERVAL` seconds (default 30), one line
  per redraw, plain ASCII, and never redraws for a `set_postfix` or a printed line in
  between; on a terminal it is tqdm's usual bar.
- `set_quiet()` / `is_quiet()`: the CLI's `--quiet` (also `MEGARLHF_QUIET=1`, inherited by
  child processes): no progress bars and no per-step lines on the terminal; the run
  directory's `logs/train.log` still gets every line.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Iterable, TextIO

# Message patterns of Megatron-Core's (and its imports') fallback and deprecation warnings
# that say nothing a megarlhf user can act on. (pytest.ini lists the same for the tests.)
KNOWN_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*absl.logging is not installed.*",
    r".*full scope is deprecated.*",
    # torch.distributed.checkpoint's deprecations, hit inside Megatron-Core's dist_checkpointing
    # on every checkpoint load (each rank):
    r".*`load_state_dict` is deprecated and will be removed.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
)

QUIET_ENV = "MEGARLHF_QUIET"
NON_TTY_INTERVAL_S = 30.0  # what launch/*.sbatch ask for with TQDM_MININTERVAL=30


def filter_known_warnings() -> None:
    """Ignore KNOWN_WARNINGS (idempotent: `warnings` drops duplicate filters)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def set_quiet(quiet: bool = True) -> None:
    """Turn --quiet on for this process and the processes it starts."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class LineStream:
    """tqdm's output stream for a non-terminal: each redraw (`\\r` + bar) becomes one line,
    and the blank writes tqdm uses to clear a bar disappear."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, stream: TextIO | None = None, **kwargs: Any):
    """A tqdm bar (see the module docstring); `kwargs` go to tqdm (total, initial, desc, unit, ...)."""
    from tqdm import tqdm

    class _Bar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kw):
            # On a terminal a redraw is free; in a file it is a line, so leave it to update().
            super().set_postfix(ordered_dict, refresh=refresh and self.megarlhf_tty, **kw)

    stream = stream if stream is not None else sys.stderr
    tty = _is_tty(stream)
    if is_quiet():
        kwargs["disable"] = True
    if tty:
        kwargs.setdefault("dynamic_ncols", True)
        kwargs["file"] = stream
    else:
        interval = float(os.environ.get("TQDM_MININTERVAL", NON_TTY_INTERVAL_S))
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, 10.0))
        # A fixed miniters turns tqdm's dynamic miniters off, and with it the monitor thread's
        # extra redraws, which would add a second line right before update()'s own.
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("ascii", True)
        kwargs["file"] = LineStream(stream)
    _Bar.megarlhf_tty = tty
    return _Bar(iterable, **kwargs)
