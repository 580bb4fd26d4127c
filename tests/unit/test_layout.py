"""Layouts: dp from the world size, and errors that name the field and the fix."""

import pytest

from megarlhf.config import ConfigError, ModelConfig
from megarlhf.parallel import Layout, LayoutError


def test_dp_follows_from_world_size():
    assert Layout(2, 2).resolve(8) == Layout(2, 2, 2)
    assert Layout(1, 1).resolve(1) == Layout(1, 1, 1)
    assert str(Layout(2, 1).resolve(4)) == "tp2-pp1-dp2"


@pytest.mark.parametrize(
    "layout,world,match",
    [
        (Layout(3, 1), 4, "tp\\*pp = 3\\*1 = 3 does not divide the world size 4"),
        (Layout(2, 2), 6, "does not divide the world size 6"),
        (Layout(2, 1, 4), 4, "needs 8 ranks, the world has 4"),
    ],
)
def test_impossible_layouts(layout, world, match):
    with pytest.raises(LayoutError, match=match):
        layout.resolve(world)


@pytest.mark.parametrize("bad", [dict(tp=0), dict(pp=-1), dict(tp=1.5), dict(dp=-2)])
def test_bad_sizes(bad):
    with pytest.raises(LayoutError, match="layout\\."):
        Layout(**bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tp=3), "num_attention_heads = 4 is not divisible by tp = 3"),
        (dict(tp=4), "num_query_groups = 2 is not divisible by tp = 4"),
        (dict(pp=3), "num_layers = 4 is not divisible by pp = 3"),
    ],
)
def test_model_does_not_split(kw, match):
    with pytest.raises(LayoutError, match=match):
        Layout(**kw).check_model(
            num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, hidden_size=64
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(arch="bert"), "model.arch"),
        (dict(hidden_size=65), "hidden_size = 65 is not divisible"),
        (dict(num_query_groups=3), "not divisible by model.num_query_groups = 3"),
        (dict(hidden_dropout=1.5), "model.hidden_dropout"),
        (dict(num_layers=0), "model.num_layers"),
    ],
)
def test_model_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_vocab_padding_and_ffn_rules():
    assert ModelConfig(vocab_size=250).padded_vocab_size == 256
    assert ModelConfig(vocab_size=32000).padded_vocab_size == 32000
    assert ModelConfig(vocab_size=32001).padded_vocab_size == 32128
    assert ModelConfig(arch="gpt", hidden_size=64).ffn_size == 256
    assert ModelConfig(arch="llama", hidden_size=4096).ffn_size == 11008  # Llama-2 7B


def test_parallel_state_ranks_are_scoped_and_restored():
    """Megatron-Core's parallel_state reports the role's ranks inside the block only, and
    its previous answers come back also when the block raises."""
    from megatron.core import parallel_state

    from megarlhf.parallel import RoleGroups, parallel_state_ranks

    def overrides():
        return parallel_state._MPU_TENSOR_MODEL_PARALLEL_RANK, parallel_state._MPU_DATA_PARALLEL_RANK

    before = overrides()
    role = RoleGroups(layout=Layout(2, 2, 4), pgc=None, tp_rank=1, pp_rank=1, dp_rank=3)
    with parallel_state_ranks(role):
        assert parallel_state.get_tensor_model_parallel_rank() == 1
        assert parallel_state.get_data_parallel_rank(with_context_parallel=True) == 3
    assert overrides() == before
    with pytest.raises(RuntimeError, match="boom"), parallel_state_ranks(role):
        raise RuntimeError("boom")
    assert overrides() == before


def test_even_microbatch_size_is_the_largest_even_split():
    from megarlhf.config.train import even_microbatch_size

    for rows in range(1, 40):
        for at_most in range(1, 20):
            got = even_microbatch_size(rows, at_most)
            naive = max(d for d in range(1, rows + 1) if rows % d == 0 and d <= at_most)
            assert got == naive, (rows, at_most)
