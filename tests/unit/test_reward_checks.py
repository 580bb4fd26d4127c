"""rollout/rewards.py checked_scores and checkpoint/verify.py, without a world."""

from __future__ import annotations

import math

import pytest

from megarlhf.checkpoint.verify import describe_files, list_files, verify_checkpoint, write_manifest
from megarlhf.rollout.rewards import RewardError, checked_scores

WHERE = ["prompt 7 (row 0)", "prompt 9 (row 1)"]


def test_scores_none_and_failures():
    out = checked_scores(lambda p, r, a: [0.5, None], "m:f", ["a", "b"], ["x", "y"], [None, None], WHERE)
    assert out[0] == 0.5 and math.isnan(out[1])
    for bad in (float("inf"), float("nan"), "high"):
        with pytest.raises(RewardError, match=rf"reward function m:f returned .* for prompt 9 \(row 1\) \(prompt 'b'\)"):
            checked_scores(lambda p, r, a: [1.0, bad], "m:f", ["a", "b"], ["x", "y"], [None, None], WHERE)
    with pytest.raises(RewardError, match="returned 1 scores for 2 samples"):
        checked_scores(lambda p, r, a: [1.0], "m:f", ["a", "b"], ["x", "y"], [None, None], WHERE)

    def raises(p, r, a):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"(?s)m:f raised on the batch of 2 samples starting at prompt 7 .*KeyError: 'answer'.*Traceback"):
        checked_scores(raises, "m:f", ["a", "b"], ["x", "y"], [None, None], WHERE)


def test_verify_names_missing_truncated_and_changed_files(tmp_path):
    (tmp_path / "role").mkdir()
    for name, data in {"role/a.bin": b"abcdef" * 100, "b.pt": b"xyz" * 50, "c.pt": b"123"}.items():
        (tmp_path / name).write_bytes(data)
    write_manifest(tmp_path, describe_files(tmp_path, list_files(tmp_path)))
    assert verify_checkpoint(tmp_path) == ([], 3)
    (tmp_path / "role" / "a.bin").write_bytes(b"abcdef" * 99)
    (tmp_path / "b.pt").write_bytes(b"xyz" * 49 + b"xyZ")
    (tmp_path / "c.pt").unlink()
    problems, _ = verify_checkpoint(tmp_path)
    assert problems == [
        f"{tmp_path / 'b.pt'}: contents changed since it was saved (xxh3_64 mismatch)",
        f"{tmp_path / 'c.pt'}: missing",
        f"{tmp_path / 'role' / 'a.bin'}: 594 bytes, 600 when saved (truncated or overwritten)",
    ]
    (tmp_path / "checksums.json").unlink()
    assert "no checksums.json" in verify_checkpoint(tmp_path)[0][0]
