"""Atomic, reshardable training checkpoints on Megatron-Core `dist_checkpointing`.

Layer: checkpoint/. Layout of one checkpoint:

    checkpoints/iter_0000100/
        <role>/              dist_checkpointing of the model (+ optimizer): loads at any TP/PP
        trainer_state.pt     rank 0: step, scheduler(s), sampler, counters, config (plain data)
        rng/rank_00003.pt    per-rank RNG states (python, numpy, torch, Megatron tracker)
    checkpoints/latest       text file: "iter_0000100", rewritten (atomically) last

Every rank writes into `iter_0000100.tmp/`; only after all ranks finished does rank 0
rename it and then update `latest`, so a crash mid-save never leaves a checkpoint that
looks complete. The oldest checkpoints beyond `keep` are removed after that.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's gathered write errors

from megarlhf.config import ConfigError, ModelConfig, dump_yaml
from megarlhf.checkpoint.verify import check_files, describe_files, list_files, read_manifest, write_manifest
from megarlhf.config.errors import TrainingDiverged
from megarlhf.config.loader import build
from megarlhf.parallel import compat
from megarlhf.parallel.layout import RoleGroups

_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded (the CLI exits with code 3)."""


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ folder or one iter_ folder -> the iter_ folder to load."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{latest} points to {target.name}, which does not exist")
            return target
    if _ITER.match(p.name) and p.is_dir():
        return p
    raise CheckpointError(
        f"no checkpoint at {p}: expected a run directory with checkpoints/latest, a checkpoints/ "
        f"folder with a 'latest' file, or an iter_NNNNNNN folder"
    )


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint's weights were trained with.

    Read from the run directory that holds it: `model_config.yaml` (weights-only
    checkpoints, e.g. converted from Hugging Face) or the `model:` section of the run's
    `config.yaml`.
    """
    run_dir = resolve_checkpoint(path).parent.parent
    for name, section in (("model_config.yaml", None), ("config.yaml", "model")):
        f = run_dir / name
        if f.is_file():
            tree = yaml.safe_load(f.read_text()) or {}
            tree = tree.get(section, {}) if section else tree
            try:
                return build(ModelConfig, tree, prefix=f"{f}: model.")
            except ConfigError as err:
                raise CheckpointError(f"cannot read the model shape of {path}: {err}") from None
    raise CheckpointError(
        f"no model_config.yaml or config.yaml in {run_dir}: cannot tell the shape of the model in {path}"
    )


def resume_checkpoint(resume: str | None, run_dir: str | Path) -> Path | None:
    """Collective. `--resume`: None -> None; 'auto' -> run_dir's latest checkpoint, or None
    when there is none yet (a fresh run), or, when the latest fails verification against
    its checksums, the newest older one that passes (said on stderr); 'strict' -> the
    latest, which must verify; anything else -> that checkpoint, which must verify.
    CheckpointError (exit code 3) names each bad file."""
    if resume is None:
        return None
    if resume not in ("auto", "strict"):
        ckpt = resolve_checkpoint(resume)
        _raise_if_bad(ckpt, _verify(ckpt))
        return ckpt
    try:
        latest = resolve_checkpoint(run_dir)
    except CheckpointError:
        latest = None
        if resume == "strict" and (Path(run_dir) / "checkpoints" / "latest").is_file():
            raise
    if latest is None and not _candidates(run_dir):
        return None
    if latest is not None and not (problems := _verify(latest)):
        return latest
    if resume == "strict":
        _raise_if_bad(latest, problems)
    failed = {latest: problems} if latest is not None else {}
    for ckpt in _candidates(run_dir):
        if ckpt == latest:
            continue
        if not (problems := _verify(ckpt)):
            if dist.get_rank() == 0:
                bad = "; ".join(f"{c.name} failed verification ({p[0]})" for c, p in failed.items())
                print(f"megarlhf: {bad or 'latest points to no checkpoint'}; falling back to {ckpt}, the newest checkpoint that verifies", file=sys.stderr, flush=True)
            return ckpt
        failed[ckpt] = problems
    raise CheckpointError(
        f"no checkpoint under {Path(run_dir) / 'checkpoints'} verifies: "
        + "; ".join(f"{c.name}: {', '.join(p)}" for c, p in failed.items())
    )


def _candidates(run_dir: str | Path) -> list[Path]:
    """Published iter_ folders under run_dir/checkpoints, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _ITER.match(p.name)), reverse=True)


def _raise_if_bad(ckpt: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt} failed verification: {'; '.join(problems)}. Resume from an older "
            f"checkpoint (`--resume auto` picks the newest that verifies; `megarlhf checkpoint verify "
            f"{ckpt.parent}` checks them all)"
        )


def latest_step(run_dir: str | Path) -> int | None:
    """Step of the newest complete checkpoint under run_dir, or None."""
    try:
        return int(_ITER.match(resolve_checkpoint(run_dir).name).group(1))
    except CheckpointError:
        return None


def _model_state(model: torch.nn.Module, groups: RoleGroups) -> dict:
    # With tied embeddings at PP > 1, Megatron-Core (through 0.19) asks parallel_state
    # (never initialised here) for the DP rank of the last stage's copy.
    with compat.tied_embeddings_rank_context(groups):
        return model.sharded_state_dict(metadata={"dp_cp_group": groups.dp})


def _check_format(role_dir: Path) -> None:
    why = compat.checkpoint_format_error(role_dir)
    if why:
        raise CheckpointError(why)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    engines: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Collective: save `engines` ({role: TrainEngine}) and `trainer_state` at `step`.

    Refuses (TrainingDiverged, before anything is written) when any weight is NaN/inf."""
    _check_finite(run_dir, step, engines)
    root, tmp, final = _start_save(run_dir, step, ["rng", *engines])
    rank = dist.get_rank()
    try:
        for role, engine in engines.items():
            model_sd = _model_state(engine.module, engine.groups)
            state = {
                "model": model_sd,
                "optimizer": engine.optimizer.sharded_state_dict(model_sd, metadata=_optim_metadata(engine)),
            }
            dist_checkpointing.save(state, str(tmp / role))  # collective: a write error is raised on every rank
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            schedulers = {role: e.scheduler.state_dict() for role, e in engines.items()}
            torch.save({**trainer_state, "step": step, "schedulers": schedulers}, tmp / "trainer_state.pt")
        failure = None
    except (Exception, CheckpointException) as err:  # ENOSPC, permissions, I/O errors, in assorted wrappers
        failure = err
    _agree_on_save(failure, root, tmp)
    _publish(root, tmp, final, keep)
    return final


def _check_finite(run_dir: str | Path, step: int, engines: dict[str, Any]) -> None:
    """Collective over the world: raise TrainingDiverged on every rank when any rank holds
    a non-finite weight of any engine (so a NaN checkpoint never replaces a good one)."""
    bad = [role for role, e in engines.items() if not all(torch.isfinite(p).all() for p in e.module.parameters())]
    flag = torch.tensor([float(len(bad))], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag)
    if flag.item():
        raise TrainingDiverged(
            f"not saving step {step}: weights of {bad or 'a model on another rank'} are not finite; "
            f"the newest checkpoint under {Path(run_dir) / 'checkpoints'} is left as it was"
        )


def _start_save(run_dir: str | Path, step: int, subdirs: list[str]) -> tuple[Path, Path, Path]:
    """Collective: rank 0 makes a fresh `iter_N.tmp/` with `subdirs`; returns (checkpoints
    root, tmp, final)."""
    root = Path(run_dir) / "checkpoints"
    final = root / iter_name(step)
    tmp = root / (iter_name(step) + ".tmp")
    failure = None
    if dist.get_rank() == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a crash during an earlier save
            for sub in subdirs:
                (tmp / sub).mkdir(parents=True)
        except OSError as err:
            failure = err
    _agree_on_save(failure, root, tmp)
    return root, tmp, final


def _agree_on_save(failure: BaseException | None, root: Path, tmp: Path) -> None:
    """Collective: when any rank failed to write its part of `tmp`, every rank raises
    CheckpointError (exit code 3) naming the directory and its free space, after rank 0
    removed `tmp`; `latest` and the published checkpoints are untouched. Otherwise a
    barrier: every rank finished writing."""
    flag = torch.tensor([0.0 if failure is None else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag)
    if not flag.item():
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    cause = _root_cause(failure) if failure is not None else "failed on another rank (see its message)"
    latest = root / "latest"
    kept = f"{latest} still points to {latest.read_text().strip()}" if latest.is_file() else "no earlier checkpoint"
    raise CheckpointError(
        f"cannot write checkpoint {tmp.name.removesuffix('.tmp')} into {root}: {cause}; "
        f"{_free_space(root)} free there; {tmp.name} removed, {kept}. Free space (or lower "
        f"train.save_total_limit) and continue with --resume auto, or set train.on_save_error=continue"
    ) from failure


def _root_cause(err: BaseException) -> str:
    """The OSError inside the wrappers of torch's and Megatron's checkpoint writers."""
    seen = [err]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    for e in seen:
        if isinstance(e, OSError):
            return f"{type(e).__name__}: {e}"
    text = str(err)
    for line in text.splitlines():  # torch's CheckpointException lists each rank's error as text
        if "Errno" in line:
            return line.strip()
    return f"{type(err).__name__}: {text[:500]}"


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    return human_bytes(shutil.disk_usage(path).free)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _publish(root: Path, tmp: Path, final: Path, keep: int | None) -> None:
    """Collective: once every rank finished writing `tmp`, the files get their checksums
    (each rank hashes a share), then rank 0 renames `tmp` to `final`, points `latest` at
    it (each step atomic) and prunes to the newest `keep`."""
    failure = None
    try:
        _write_checksums(tmp)
    except OSError as err:
        failure = err
    _agree_on_save(failure, root, tmp)
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        if keep is not None:
            _prune(root, keep)
    dist.barrier()


def _write_checksums(ckpt: Path) -> None:
    """Collective: `checksums.json` of every file in `ckpt`, file i hashed by rank i % world."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [list_files(ckpt) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    mine = describe_files(ckpt, box[0][rank::world])
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank == 0:
        write_manifest(ckpt, {k: v for part in parts for k, v in part.items()})


def _verify(ckpt: Path) -> list[str]:
    """Collective: problems of `ckpt` against its checksums, each rank checking a share."""
    expected = read_manifest(ckpt)
    if expected is None:
        return []  # saved before checksums existed: loads unverified, as before
    rank, world = dist.get_rank(), dist.get_world_size()
    problems = check_files(ckpt, expected, sorted(expected)[rank::world])
    gathered = [None] * world
    dist.all_gather_object(gathered, problems)
    return [p for part in gathered for p in part]


def _has_optimizer_state(where: Path) -> bool:
    """Whether a role's dist checkpoint holds Adam moments (read from its metadata only)."""
    return any("exp_avg" in key for key in dist_checkpointing.load_tensors_metadata(str(where)))


def _optim_metadata(engine) -> dict[str, Any]:
    # 'dp_reshardable' lets a distributed-optimizer checkpoint load at another DP size.
    return {"distrib_optim_sharding_type": "dp_reshardable", "dp_cp_group": engine.groups.dp}


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and _ITER.match(p.name))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(
    model: torch.nn.Module, groups: RoleGroups, path: str | Path, role: str, exclude: tuple[str, ...] = ()
) -> Path:
    """Load the model weights of `role` into `model` (any saved TP/PP -> this layout).

    Parameters whose names start with a prefix in `exclude` keep their current values
    (e.g. a freshly initialised value head on top of an SFT policy).
    """
    ckpt = resolve_checkpoint(path)
    if not (ckpt / role).is_dir():
        found = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and p.name != "rng")
        raise CheckpointError(f"{ckpt} has no '{role}' model (it has: {found})")
    _check_format(ckpt / role)
    try:
        wanted = {k: v for k, v in _model_state(model, groups).items() if not k.startswith(exclude)}
        state = dist_checkpointing.load({"model": wanted}, str(ckpt / role))
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith(exclude) and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt / role}: missing {missing}, unexpected {unexpected}")
    except CheckpointError:
        raise
    except Exception as err:  # shape/key mismatches surface as assorted exception types
        raise CheckpointError(f"cannot load {role} weights from {ckpt}: {err}") from err
    return ckpt


def read_saved_tensor(path: str | Path, role: str, key: str) -> torch.Tensor | None:
    """Collective: the full tensor `key` of `role`'s model in a checkpoint, None if it has
    none; for keys today's model no longer has (`load_model_weights` skips those), e.g.
    the `output_layer.bias` of value heads trained before it was removed."""
    where = resolve_checkpoint(path) / role
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(where)).get(key)
        if saved is None:
            return None
        saved.init_data("cpu")  # the metadata describes the full tensor; load fills it
        return dist_checkpointing.load({"model": {key: saved}}, str(where))["model"][key]
    except Exception as err:
        raise CheckpointError(f"cannot read {key} from {where}: {err}") from err


def save_model_weights(
    model: torch.nn.Module, groups: RoleGroups, run_dir: str | Path, role: str, step: int = 0, source: str = ""
) -> Path:
    """Collective: a weights-only checkpoint of `model` as `role` (no optimizer, no RNG).

    Same layout and atomicity as `save_checkpoint`, so `load_model_weights` and the
    trainers' `init_from` read it at any TP/PP. trainer_state.pt holds {"step", "source"};
    `run_dir/model_config.yaml` records the ModelConfig to build the model with.
    """
    root, tmp, final = _start_save(run_dir, step, [role])
    rank = dist.get_rank()
    dist_checkpointing.save({"model": _model_state(model, groups)}, str(tmp / role))
    if rank == 0:
        torch.save({"step": step, "source": source}, tmp / "trainer_state.pt")
        (Path(run_dir) / "model_config.yaml").write_text(dump_yaml(model.megarlhf_config))
    _publish(root, tmp, final, keep=None)
    return final


def load_checkpoint(path: str | Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Collective: restore models, optimizers, schedulers and this rank's RNG.

    Returns the trainer state saved with it (step, sampler, ...).
    """
    ckpt = resolve_checkpoint(path)
    for role in engines:
        _check_format(ckpt / role)
    try:
        for role, engine in engines.items():
            model_sd = _model_state(engine.module, engine.groups)
            sharded = {"model": model_sd}
            # Saved before the first applied optimizer step (e.g. every step so far skipped
            # as non-finite): Adam has no moments yet, and a fresh optimizer is that state.
            has_optimizer = _has_optimizer_state(ckpt / role)
            if has_optimizer:
                sharded["optimizer"] = engine.optimizer.sharded_state_dict(
                    model_sd, is_loading=True, metadata=_optim_metadata(engine)
                )
            state = dist_checkpointing.load(sharded, str(ckpt / role))
            engine.module.load_state_dict(state["model"], strict=True)
            if has_optimizer:
                engine.optimizer.load_state_dict(state["optimizer"])
        trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    except Exception as err:
        if "Could not find parameter group" in str(err):  # Megatron-Core 0.19+ matches groups by their settings
            raise CheckpointError(
                f"cannot load checkpoint {ckpt}: its optimizer parameter groups were saved with other "
                f"settings (learning rate, weight decay or their multipliers) than this run's optim.*; "
                f"resume with the run's own optim settings (its config.yaml), or start a new run from "
                f"its weights with init_from={ckpt} (sft_model_path= for PPO and GRPO). Megatron-Core says: {str(err).splitlines()[0]}"
            ) from err
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {err}") from err
    for role, engine in engines.items():
        engine.scheduler.load_state_dict(trainer_state["schedulers"][role])
    rng_file = ckpt / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file() and len(list((ckpt / "rng").iterdir())) == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
