"""examples/smollm2/make_pairs.py: DPO pairs from `megarlhf generate --n K` rows, hand-checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "smollm2"))
from make_pairs import build_pairs, main  # noqa: E402

PROMPTS = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]


def _s(line, sample, response, score):
    return {"line": line, "sample": sample, "response": response, "score": score}


def test_best_against_worst_per_prompt_and_ties_skipped():
    samples = [_s(1, 0, "a", 0.0), _s(1, 1, "b", 1.0), _s(1, 2, "c", 0.5), _s(1, 3, "d", 1.0),
               _s(2, 0, "x", 0.0), _s(2, 1, "y", 0.0),  # no preference
               _s(3, 0, "p", 1.0), _s(3, 1, "q", 0.0)]  # fmt: skip
    pairs, counts = build_pairs(PROMPTS, samples)
    assert counts == {"prompts": 3, "no_preference": 1, "pairs": 2}
    assert pairs[0] == {"prompt": PROMPTS[0]["prompt"], "chosen": "b", "rejected": "a"}  # first top sample vs worst
    assert pairs[1] == {"prompt": PROMPTS[2]["prompt"], "chosen": "p", "rejected": "q"}
    more, _ = build_pairs(PROMPTS, samples, pairs_per_prompt=2)
    assert [(p["chosen"], p["rejected"]) for p in more] == [("b", "a"), ("p", "q")]  # only one sample scored 0 on line 1


def test_identical_texts_make_no_pair_and_unscored_samples_are_refused(tmp_path):
    pairs, counts = build_pairs(PROMPTS, [_s(1, 0, "same", 1.0), _s(1, 1, "same", 0.0)])
    assert pairs == [] and counts["pairs"] == 0
    with pytest.raises(SystemExit, match="no score"):
        build_pairs(PROMPTS, [{"line": 1, "sample": 0, "response": "r"}])
    prompts, samples = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    samples.write_text(json.dumps(_s(1, 0, "a", 0.0)) + "\n" + json.dumps(_s(1, 1, "a2", 0.0)) + "\n")
    with pytest.raises(SystemExit, match="no pairs"):
        main(["--prompts", str(prompts), "--samples", str(samples), "--out", str(tmp_path / "o.jsonl")])
