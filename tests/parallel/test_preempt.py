"""A stop signal seen by one rank stops every rank after the same step."""

from __future__ import annotations

import os
import signal


def stop_case(signalled_rank: int):
    import torch.distributed as dist

    from megarlhf.trainers.preempt import SIGNALS, StopRequest

    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        stop = StopRequest()
        before = stop.agreed("cpu")
        if dist.get_rank() == signalled_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return stop.signal_name, before, stop.agreed("cpu")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_one_signalled_rank_stops_both(world2):
    assert world2.run(stop_case, 1) == [(None, False, True), ("SIGUSR1", False, True)]
