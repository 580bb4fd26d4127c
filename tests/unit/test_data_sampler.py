"""ShardedSampler: epoch order, resume, and "dp ranks together equal one rank"."""

import json

import pytest
import torch

from megarlhf.config import ConfigError
from megarlhf.data.sampler import ShardedSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def global_batches(n_samples, gbs, dp_size, seed, steps, **kw):
    """Global batches rebuilt from every rank's share (rank order = chunk order)."""
    ranks = [ShardedSampler(n_samples, gbs, r, dp_size, seed, **kw) for r in range(dp_size)]
    return [sum((s.next_batch() for s in ranks), []) for _ in range(steps)]


def test_batches_follow_the_seeded_permutation_and_skip_the_tail():
    n, gbs, seed = 10, 4, 7  # 2 full batches per epoch, a tail of 2 is skipped
    got = take(ShardedSampler(n, gbs, 0, 1, seed), 6)
    want = []
    for epoch in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        want += [order[0:4], order[4:8]]
    assert got == want


def test_no_sample_repeats_within_an_epoch():
    s = ShardedSampler(103, 8, 0, 1, seed=3)
    for _ in range(3):
        epoch = sum(take(s, s.batches_per_epoch), [])
        assert len(epoch) == len(set(epoch)) == 96 and set(epoch) <= set(range(103))


def test_deterministic_and_seed_dependent():
    assert take(ShardedSampler(50, 10, 1, 2, seed=0), 12) == take(ShardedSampler(50, 10, 1, 2, seed=0), 12)
    assert take(ShardedSampler(50, 10, 1, 2, seed=0), 12) != take(ShardedSampler(50, 10, 1, 2, seed=1), 12)


@pytest.mark.parametrize("dp_size", [2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_union_over_dp_ranks_equals_single_rank_batch(dp_size, drop_last):
    single = global_batches(37, 8, 1, seed=5, steps=20, drop_last=drop_last)
    assert global_batches(37, 8, dp_size, seed=5, steps=20, drop_last=drop_last) == single
    shares = [ShardedSampler(37, 8, r, dp_size, 5, drop_last=drop_last).next_batch() for r in range(dp_size)]
    assert all(len(s) == 8 // dp_size for s in shares)
    assert not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("stop_at", [1, 3, 4, 9])  # mid-epoch, at an epoch boundary, later epochs
@pytest.mark.parametrize("resume_dp", [1, 2])
def test_resume_yields_what_the_uninterrupted_run_yields(stop_at, resume_dp):
    n, gbs, seed = 30, 8, 11  # 3 batches per epoch
    uninterrupted = global_batches(n, gbs, 1, seed, steps=stop_at + 10)
    first = ShardedSampler(n, gbs, 0, 1, seed)
    take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain JSON-able values
    resumed = [ShardedSampler(n, gbs, r, resume_dp, seed) for r in range(resume_dp)]
    for s in resumed:
        s.load_state_dict(state)
    after = [sum((s.next_batch() for s in resumed), []) for _ in range(10)]
    assert after == uninterrupted[stop_at:]


def test_state_dict_fields():
    s = ShardedSampler(30, 8, 0, 1, seed=2)
    take(s, 4)  # 3 per epoch: one into epoch 1
    state = s.state_dict()
    assert (state["epoch"], state["consumed_in_epoch"], state["seed"]) == (1, 8, 2)


def test_resume_with_other_settings_is_refused():
    state = ShardedSampler(30, 8, 0, 1, seed=2).state_dict()
    with pytest.raises(ConfigError, match="sampler checkpoint has seed=2 but this run has 3"):
        ShardedSampler(30, 8, 0, 1, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_samples=30 but this run has 31"):
        ShardedSampler(31, 8, 0, 1, seed=2).load_state_dict(state)


def test_no_shuffle_and_no_drop_last_wraps_the_tail():
    s = ShardedSampler(10, 4, 0, 1, seed=0, shuffle=False, drop_last=False)
    assert take(s, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [0, 1, 2, 3]]


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="global_batch_size=6 must be a positive multiple of the data-parallel size"):
        ShardedSampler(100, 6, 0, 4, seed=0)
    with pytest.raises(ConfigError, match="dp_rank=2 is outside"):
        ShardedSampler(100, 8, 2, 2, seed=0)
    with pytest.raises(ConfigError, match="exceeds the dataset's 5 samples"):
        ShardedSampler(5, 8, 0, 1, seed=0)
