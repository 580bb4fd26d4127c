"""tools/bench/trl_grpo.py's `--reward gsm8k` (the TRL side of tools/bench/grpo_smollm2_vs_trl.py)
scores a completion as megarlhf's GRPO does: the same token ids decoded by the model's own
tokenizer without its end-of-sequence ids, megarlhf/rollout/math_rewards.py's strict rule against
the row's answer, the missing-EOS penalty on a completion that does not end in EOS. Oracle:
megarlhf's tokenizer and rule on the same ids, and the hand-written scores."""

from __future__ import annotations

import sys
from pathlib import Path

from megarlhf.data import load_tokenizer
from megarlhf.rollout.math_rewards import gsm8k_reward
from tests.hf_fixtures import hf_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))
import trl_grpo  # noqa: E402  (imports TRL inside main() only)


def test_trl_side_gsm8k_reward_scores_like_megarlhf(tmp_path):
    folder = hf_tokenizer(tmp_path / "tok", "chatml")
    tok = load_tokenizer(folder)
    texts = ["2 + 3 = 5 apples.\n#### 5", "#### 6", "The answer is 5.", "So 5.\n#### 5", "#### 1,000", "#### 7\n#### 4"]
    answers = ["5", "5", "5", "5", "1000", "4"]
    ended = [True, True, True, False, True, True]
    ids = [tok.encode(t) + ([tok.eos_id] if e else []) for t, e in zip(texts, ended)]
    fn = trl_grpo.make_math_reward(str(folder), tok.eos_id, tok.pad_id, 0.5, trl_grpo.Meter(1, 1))
    got = fn(prompts=[""] * 6, completions=[""] * 6, completion_ids=ids, answer=answers)
    decoded = [tok.decode([t for t in x if t not in tok.eos_ids]) for x in ids]
    oracle = [s - (0.0 if e else 0.5) for s, e in zip(gsm8k_reward(completions=decoded, answers=answers), ended)]
    assert got == oracle == [1.0, 0.0, 0.0, 0.5, 1.0, 1.0]
