"""Long-lived multi-process gloo worlds for parallel tests.

Importing Megatron-Core costs 5-12 s per process, so each world size gets one set of
worker processes for the whole session (a pytest fixture in conftest.py). A test sends a
module-level function and its arguments; every rank runs it and the per-rank results
come back in rank order. A rank that raises reports its traceback; a world that stops
answering (e.g. ranks deadlocked in mismatched collectives) is torn down and the test
fails with a timeout instead of hanging the suite.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)  # 2 cores shared by up to 4 ranks
    try:
        from megarlhf.parallel import init_distributed

        init_distributed(timeout_s=120)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    import torch.distributed as dist

    dist.destroy_process_group()


class WorldError(RuntimeError):
    pass


class World:
    """`world_size` ranks kept alive; `run(fn, ...)` executes fn on all of them."""

    def __init__(self, world_size: int, start_timeout_s: float = 180.0):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            # Not daemonic: dist_checkpointing's save forks writer processes of its own.
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=False)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        atexit.register(self.close, force=True)  # never leave ranks behind the test run
        self._collect("startup", start_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            try:
                rank, status, value = self.results.get(timeout=timeout_s)
            except queue.Empty:
                self.close(force=True)
                raise WorldError(f"{what}: no answer from all ranks within {timeout_s:.0f} s") from None
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
                # The other ranks may be stuck in a collective with the failed one.
                timeout_s = min(timeout_s, 30.0)
            out[rank] = value
        if errors:
            self.close(force=True)
            raise WorldError(f"{what} failed:\n" + "\n".join(errors))
        return out

    def run(self, fn: Callable, *args, timeout_s: float = 600.0, **kwargs) -> list[Any]:
        if not self.alive:
            raise WorldError("world is closed (an earlier test broke it)")
        for q in self.tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", str(fn)), timeout_s)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        if not force and self.alive:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                # A rank's own children (dist_checkpointing's async writers) die with it.
                try:
                    children = psutil.Process(p.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    children = []
                p.kill()
                p.join()
                for child in children:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
