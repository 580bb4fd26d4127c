"""Megatron-Core releases: the only module that knows which one is installed.

Layer: parallel/. megarlhf supports `megatron-core>=0.16.1,<0.20` (0.16.1 is the last
release for Python 3.11; 0.17.0 on need Python >= 3.12). CI runs the full suite on 0.16.1
and the Megatron-touching tiers on 0.19.2 (docs/megatron-versions.md). Everything outside
this module is written against what both ends of that range share; where they differ,
this module adapts, by version (never by `hasattr` guesses: 0.19's
`ProcessGroupCollection.__getattr__` answers None for any declared field, so `hasattr`
is always True there):

- Inference flag (0.18+): Megatron decides "this forward is inference" from a
  process-wide `InferenceMode` flag, not from `inference_context is not None and not
  training` (0.16/0.17). `inference_mode()` sets it around megarlhf's own generation
  (so a static KV cache again computes last-token logits only, as on 0.16.1), and
  `leave_inference_mode()` clears it before every training/scoring forward: a Megatron
  engine that set it and never cleared it (the static engine sets it in its constructor)
  would otherwise fail the next training forward with "Inference must always gather TP
  logits" (tests/parallel/test_mcore_compat.py).
- Tied embeddings at PP > 1 (through 0.19.2; fixed on Megatron-LM main, expected in
  0.20): the last stage's sharded state asks `parallel_state.get_data_parallel_rank()`
  although megarlhf never initialises parallel_state's groups.
  `tied_embeddings_rank_context(groups)` supplies the role's ranks there, for the
  releases that need it.
- Checkpoint format (0.17+/0.19): common state moved into the torch_dist files, so
  0.16.1 cannot read a checkpoint that 0.19 wrote (0.19 reads 0.16.1's). megarlhf passes
  no save/load strategies (0.17+ reject strategy tuples on load), so the calls are the
  same; `checkpoint_format_error(path)` turns "0.16.1 meets a newer checkpoint" into an
  actionable message instead of a missing-file error.
- `import megatron.core` >= 0.17.1 replaces `torch.storage._load_from_bytes` by a
  `weights_only=True` version (process-wide). megarlhf unpickles only tensors that way
  (object collectives), which that allows; its own `torch.load`s pass `weights_only`.
"""

from __future__ import annotations

import contextlib
import json
from importlib import metadata
from pathlib import Path
from typing import Iterator

SUPPORTED_RANGE = ((0, 16, 1), (0, 20, 0))
"""[lowest, first unsupported): what setup.py admits and CI proves."""


def _parse(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def _installed_version() -> tuple[int, int, int]:
    try:
        return _parse(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH (NGC's /opt/megatron-lm)
        from megatron.core import package_info

        return _parse(package_info.__version__)


MCORE_VERSION = _installed_version()
"""(major, minor, patch) of the installed Megatron-Core."""

HAS_INFERENCE_MODE_FLAG = MCORE_VERSION >= (0, 18, 0)
TIED_EMBEDDINGS_NEED_PARALLEL_STATE = MCORE_VERSION < (0, 20, 0)
COMMON_STATE_IN_TORCH_DIST = MCORE_VERSION >= (0, 17, 0)


def version_string() -> str:
    return ".".join(map(str, MCORE_VERSION))


def check_supported() -> None:
    """RuntimeError naming the fix if the installed release is outside the range."""
    low, high = SUPPORTED_RANGE
    if not low <= MCORE_VERSION < high:
        raise RuntimeError(
            f"megatron-core {version_string()} is installed; megarlhf supports "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}: "
            f"pip install 'megatron-core>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}'"
        )


# --- inference flag -----------------------------------------------------------------


def _flag():
    from megatron.core.inference.utils import InferenceMode

    return InferenceMode


def inference_mode_active() -> bool:
    """Whether Megatron-Core treats forwards as inference (always False before 0.18,
    where a forward with an inference context in eval mode is inference by itself)."""
    return HAS_INFERENCE_MODE_FLAG and _flag().is_active()


@contextlib.contextmanager
def inference_mode() -> Iterator[None]:
    """Megatron's inference flag for the block (0.18+; nothing before), then whatever it
    was before, also on error."""
    if not HAS_INFERENCE_MODE_FLAG:
        yield
        return
    flag = _flag()
    was = flag.is_active()
    flag.set_active()
    try:
        yield
    finally:
        if not was:
            flag.unset_active()


def leave_inference_mode() -> bool:
    """Clear Megatron's inference flag before a training or scoring forward. Returns
    whether it was set (by an engine that did not clear it)."""
    if not inference_mode_active():
        return False
    _flag().unset_active()
    return True


# --- weight refit -------------------------------------------------------------------


def forget_refit_plans() -> None:
    """Drop Megatron-Core's cached resharding plans (0.17+ cache them per process, keyed
    by the layouts' sizes only, not by the models): a WeightRefit between new models of
    the same layout sizes would otherwise replay a plan built for other models and copy
    the wrong slices without an error. Called once per WeightRefit; the next refit
    builds its plan again (a collective, as the first one always was)."""
    try:
        from megatron.core.resharding.refit import clear_plan_cache
    except ImportError:  # 0.16.1 builds the plan on every call: nothing cached
        return
    clear_plan_cache()


# --- tied embeddings at PP > 1 ------------------------------------------------------


def tied_embeddings_rank_context(groups) -> contextlib.AbstractContextManager:
    """Around `model.sharded_state_dict(...)`: releases whose tied output layer asks
    parallel_state for the DP rank get the role's ranks (layout.parallel_state_ranks)."""
    if not TIED_EMBEDDINGS_NEED_PARALLEL_STATE:
        return contextlib.nullcontext()
    from megarlhf.parallel.layout import parallel_state_ranks

    return parallel_state_ranks(groups)


# --- checkpoints --------------------------------------------------------------------


def checkpoint_format_error(role_dir: str | Path) -> str | None:
    """Why this Megatron-Core cannot read the dist checkpoint in `role_dir`, or None.

    0.16.1 keeps the common (non-sharded) state in `common.pt`; 0.17+ write it into the
    torch_dist files and no `common.pt`. Newer releases read both layouts.
    """
    role_dir = Path(role_dir)
    meta = role_dir / "metadata.json"
    if COMMON_STATE_IN_TORCH_DIST or not meta.is_file():
        return None
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, ValueError):
        return None
    if backend == "torch_dist" and not (role_dir / "common.pt").is_file():
        return (
            f"{role_dir} was written by megatron-core >= 0.17 (no common.pt: its common state "
            f"is inside the torch_dist files), which megatron-core {version_string()} cannot "
            f"read; load it with megatron-core>=0.17 (Python >= 3.12), see docs/megatron-versions.md"
        )
    return None
