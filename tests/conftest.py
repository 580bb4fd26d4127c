"""Suite-wide fixtures."""

import pytest


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed as a world of one in the pytest process (CPU layer installed),
    with the groups of a TP1/PP1/DP1 layout."""
    from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all

    init_distributed()
    groups = build_parallel_context({"actor": Layout(1, 1)})["actor"]
    seed_all(0, groups)
    return groups
