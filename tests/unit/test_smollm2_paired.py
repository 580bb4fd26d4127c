"""examples/smollm2/recipe.py's paired comparison: a trained model's greedy answers against its
starting model's on the same prompts (answers gained / lost, the accuracy difference and its
95% Wald interval for paired proportions), against hand-computed values."""

from __future__ import annotations

import json
import math

from examples.smollm2.recipe import Recipe, parse


def test_paired_change_counts_gained_and_lost_answers(tmp_path):
    recipe = Recipe(parse(["--root", str(tmp_path), "--out", str(tmp_path)]))
    before = [1, 1, 0, 0, 0, 1, 0, 1, 0, 0]
    after = [1, 0, 1, 1, 0, 1, 1, 1, 0, 0]  # prompts 2, 3, 6 gained; prompt 1 lost
    for name, scores in (("sft", before), ("grpo", after)):
        rows = [{"index": i, "score": float(s)} for i, s in enumerate(scores)]
        (tmp_path / "recipe" / f"eval_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = recipe.paired("grpo", "sft")
    assert (p["gained"], p["lost"]) == (3, 1)
    half = 1.96 * math.sqrt(3.6) / 10  # sqrt(b + c - (b - c)^2 / n) / n with b=3, c=1, n=10
    assert math.isclose(p["diff"], 0.2) and math.isclose(p["diff_low"], 0.2 - half) and math.isclose(p["diff_high"], 0.2 + half)
    assert recipe.paired("grpo", "instruct") is None  # no evaluation of the start: no comparison
