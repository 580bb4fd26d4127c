"""torch.distributed initialisation from torchrun or SLURM environments.

Layer: parallel/. NCCL on GPU, gloo on CPU (where the CPU platform layer is installed
first). A single process with no launcher environment becomes a world of one.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """'torchrun', 'slurm' or 'single'."""


def expand_first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[012-015,020],cpu1' -> 'gpu012'."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = first.groups()
    if ranges is None:
        return prefix
    start = ranges.split(",")[0].split("-")[0]
    return prefix + start


def detect_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/master from torchrun's variables, else SLURM's, else a world of one.

    torchrun wins when both are present (`srun torchrun ...`: SLURM sets SLURM_PROCID for
    the torchrun agent, torchrun sets RANK for each worker).
    """
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # A per-job port so that two jobs sharing a node do not collide.
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or expand_first_host(nodelist),
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def init_distributed(timeout_s: float = 600.0) -> LaunchEnv:
    """Initialise the default process group (idempotent) and the CPU layer where needed."""
    from megarlhf.parallel import cpu_compat

    launch = detect_launch_env()
    # Megatron's TP layers want kernels queued in issue order (comm/compute overlap).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.install()
    _init_megatron_globals()
    if dist.is_initialized():
        return launch
    if on_gpu:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    # HyperCommGrid reads WORLD_SIZE from the environment before asking torch.distributed.
    os.environ["WORLD_SIZE"] = str(launch.world_size)
    if launch.launcher == "single":
        # A world of one still needs a store; a free port avoids clashes between runs.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    else:
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    dist.init_process_group(
        backend="nccl" if on_gpu else "gloo",
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _register_process(launch.rank)
    return launch


_PROC_KEY = "megarlhf/process/{}"
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _register_process(rank: int) -> None:
    """Record `host pid` of this rank in the world's store, so that a survivor can name a
    rank that died (`lost_peers`)."""
    import socket

    store = dist.distributed_c10d._get_default_store()
    store.set(_PROC_KEY.format(rank), f"{socket.gethostname()} {os.getpid()}")


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie is dead too
    except FileNotFoundError:
        return True


def lost_peers(err: BaseException) -> str | None:
    """When `err` is a collective failing because a peer process went away: a sentence
    naming the ranks of this host found dead (their pids from the store), or saying which
    could not be checked; None for any other error. Called by the CLI after a failure."""
    import socket

    if not any(s in str(err) for s in _PEER_LOST) or not dist.is_initialized():
        return None
    me, host = dist.get_rank(), socket.gethostname()
    dead, unknown = [], 0
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=2))
        for rank in range(dist.get_world_size()):
            if rank == me:
                continue
            peer_host, pid = store.get(_PROC_KEY.format(rank)).decode().split()
            if peer_host != host:
                unknown += 1
            elif _process_gone(int(pid)):
                dead.append(f"rank {rank} (pid {pid})")
    except Exception:  # the store lives in rank 0's process: gone with it
        return f"rank {me} lost a peer: the store is unreachable, so rank 0 (which hosts it) is gone"
    if dead:
        return f"rank {me} lost {', '.join(dead)}: the process is gone"
    return f"rank {me} lost a peer" + (f" on another host ({unknown} ranks there could not be checked)" if unknown else "")


def _init_megatron_globals() -> None:
    """Process-wide Megatron-Core state that is not tied to a layout.

    Groups are per role (see layout.py) and never go through parallel_state; only the
    scratch buffer that the unfused core attention and sequence-parallel gathers borrow
    from lives there.
    """
    from megatron.core import parallel_state

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
