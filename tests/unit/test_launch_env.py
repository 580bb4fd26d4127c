"""Rank/world/master detection from torchrun and SLURM variables."""

import pytest

from megarlhf.parallel.distributed import detect_launch_env, expand_first_host


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node1", "node1"),
        ("gpu[012-015,020]", "gpu012"),
        ("gpu[3,5-7],cpu1", "gpu3"),
        ("a-b-c[1-2]", "a-b-c1"),
        ("host1,host2", "host1"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert expand_first_host(nodelist) == first


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3, 8, 1, "n0", 1234, "torchrun",
    )  # fmt: skip


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect_launch_env(env).launcher == "torchrun"


def test_slurm_variables_and_per_job_port():
    env = {
        "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[100-107]", "SLURM_JOB_ID": "4242",
    }  # fmt: skip
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 1, "gpu100", "slurm")
    assert e.master_port == 20000 + 4242


def test_no_launcher_is_a_world_of_one():
    e = detect_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
