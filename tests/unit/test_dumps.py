"""Rollout dumps: every batch column comes back from Parquet bit-exact, with its dtype."""

from __future__ import annotations

import pytest
import torch

from megarlhf.trainers.dumps import GENERATED, dump_path, read_rollouts, write_rollouts


def test_dump_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, t = 3, 7
    mask = torch.zeros(n, t)
    mask[0, 2:5], mask[1, 3:7], mask[2, 2:3] = 1, 1, 1
    batch = {
        "tokens": torch.randint(0, 30, (n, t), generator=g),
        "mask": mask,
        "prompt_lengths": torch.tensor([2, 3, 2]),
        "response_lengths": mask.sum(1).long(),
        "lengths": torch.tensor([5, 7, 3]),
        "last_index": torch.tensor([4, 6, 2]),
        "finished": torch.tensor([True, False, True]),
        "engine_logprobs": torch.randn(n, t, generator=g) * mask,
        "engine_entropy": torch.rand(n, t, generator=g) * mask,
        "advantages": torch.randn(n, t, generator=g, dtype=torch.float32),
        "scores": torch.randn(n, generator=g),
    }
    items = [{"prompt_ids": torch.tensor([1, 2, 3][: int(p)]), "prompt_text": f"p{i}", "answer": [i, "x"]}
             for i, p in enumerate(batch["prompt_lengths"])]  # fmt: skip
    path = write_rollouts(dump_path(tmp_path, 4), batch, items, lambda ids: " ".join(map(str, ids)), policy_version=3)
    assert path == tmp_path / "rollouts" / "iter_0000004.parquet"
    back, back_items, version = read_rollouts(path, GENERATED + ("advantages", "scores"))
    assert version == 3
    for key, value in batch.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert [it["answer"] for it in back_items] == [[0, "x"], [1, "x"], [2, "x"]]
    assert all(torch.equal(a["prompt_ids"], b["prompt_ids"]) for a, b in zip(items, back_items))

    import pyarrow.parquet as pq

    texts = pq.read_table(path).to_pydict()["response_text"]
    assert texts[0] == " ".join(map(str, batch["tokens"][0, 2:5].tolist()))


def test_read_rollouts_names_a_bad_file(tmp_path):
    with pytest.raises(ValueError, match="no such rollout dump"):
        read_rollouts(tmp_path / "missing.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a megarlhf rollout dump"):
        read_rollouts(tmp_path / "other.parquet")
