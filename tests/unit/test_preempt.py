"""StopRequest: a signal only sets a flag; `agreed()` reports it (one all-reduce). With
several ranks: tests/parallel/test_preempt.py; through SLURM: tests/e2e/test_slurm.py."""

from __future__ import annotations

import os
import signal

import pytest

from megarlhf.trainers.preempt import SIGNALS, StopRequest


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_the_world_agrees(single_rank, restore_handlers, sig):
    stop = StopRequest()
    assert stop.signal_name is None and not stop.agreed("cpu")
    os.kill(os.getpid(), sig)  # handled between bytecodes: the process goes on
    assert stop.signal_name == sig.name
    assert stop.agreed("cpu")


def test_stopped_logs_and_leaves_the_marker_for_the_launch_script(tmp_path, restore_handlers):
    from megarlhf.config import LayoutConfig
    from megarlhf.trainers.run import RunDir

    run = RunDir(tmp_path, LayoutConfig(), is_main=True, resume=False)
    stop = StopRequest()
    stop.signal_name = "SIGUSR1"
    assert stop.stopped(run, "sft", 7) == {"stage": "sft", "steps": 7, "stopped_by": "SIGUSR1"}
    assert (tmp_path / "logs" / "stopped").read_text() == "SIGUSR1 step 7\n"
    assert "SIGUSR1: stopped after step 7 with a checkpoint" in (tmp_path / "logs" / "train.log").read_text()
    assert not (tmp_path / "summary.json").exists()
