"""Synthetic sorting task: data for every stage (SFT, preferences, RL prompts) and its reward.

Layer: data/ (imports stdlib and megarlhf.config only).

Prompt `"sort: 7 2 9 4"` (n digits, n uniform in [min_len, max_len], duplicates allowed);
correct response `"2 4 7 9"`. Why sorting: the answer must get both the content (which
digits, how many) and their order right, so a policy cannot score by learning to emit one
fixed token, and a ~1-20M model still learns it on two CPU cores in minutes. The reward
is graded (fraction of positions right) and checked exactly, so "reward went up" is an
unambiguous sign of learning.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Set
from pathlib import Path

from megarlhf.config.errors import ConfigError

PREFIX = "sort: "
FILES = ("sft", "sft_test", "prefs_train", "prefs_test", "prompts_train", "prompts_test")


def sorted_answer(prompt: str) -> str:
    """The correct response to a sorting prompt."""
    return " ".join(sorted(re.findall(r"\d", prompt)))


def sort_reward(prompt: str, response: str) -> float:
    """Fraction of positions where the response has the right digit, in [0, 1].

    target = sorted digits of the prompt; the response is split on whitespace; a position
    counts when its token equals the target digit there (a non-digit token never does);
    dividing by max(len(response), len(target)) penalises missing and extra tokens alike.
    """
    target = sorted(re.findall(r"\d", prompt))
    tokens = response.split()
    if not tokens or not target:
        return 0.0
    correct = sum(tok == want for tok, want in zip(tokens, target))
    return correct / max(len(tokens), len(target))


def _check_lengths(min_len: int, max_len: int) -> None:
    # >= 2: a one-digit list has no wrong order, and dropping its element leaves an empty response.
    if not 2 <= min_len <= max_len:
        raise ConfigError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")


def _digits(rng: random.Random, min_len: int, max_len: int) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(rng.randint(min_len, max_len))]


def make_prompts(
    n: int, rng: random.Random, min_len: int = 3, max_len: int = 6, exclude: Set[str] = frozenset()
) -> list[str]:
    """`n` prompts, none of them in `exclude` (how test prompts are kept out of training)."""
    _check_lengths(min_len, max_len)
    prompts: list[str] = []
    budget = 100 * n + 1000  # rejection sampling; only a tiny prompt space can exhaust this
    while len(prompts) < n:
        budget -= 1
        if budget < 0:
            raise ConfigError(f"cannot draw {n} prompts of {min_len}..{max_len} digits outside the excluded set")
        p = PREFIX + " ".join(_digits(rng, min_len, max_len))
        if p not in exclude:
            prompts.append(p)
    return prompts


def make_sft(
    n: int, rng: random.Random, min_len: int = 3, max_len: int = 6, exclude: Set[str] = frozenset()
) -> list[dict]:
    """`{"prompt", "response"}` pairs with correct responses."""
    return [{"prompt": p, "response": sorted_answer(p)} for p in make_prompts(n, rng, min_len, max_len, exclude)]


def corrupt(prompt: str, rng: random.Random) -> str:
    """A wrong answer, drawn uniformly among the corruptions that apply to this prompt."""
    given = re.findall(r"\d", prompt)
    target = sorted(given)
    swaps = [i for i in range(len(target) - 1) if target[i] != target[i + 1]]
    options = ["replace", "drop", "duplicate"]
    if swaps:  # all-equal digits have no adjacent unequal pair
        options.append("swap")
    if given != target:  # the prompt's own order is only wrong if it is not already sorted
        options.append("unsorted")
    kind = rng.choice(sorted(options))
    out = list(target)
    if kind == "swap":
        i = rng.choice(swaps)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "replace":
        i = rng.randrange(len(out))
        out[i] = rng.choice([d for d in "0123456789" if d != out[i]])
    elif kind == "drop":
        del out[rng.randrange(len(out))]
    elif kind == "duplicate":
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    else:
        out = given
    return " ".join(out)


def make_preferences(
    n: int, rng: random.Random, min_len: int = 3, max_len: int = 6, exclude: Set[str] = frozenset()
) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}`: chosen is correct (reward 1), rejected is a corruption
    (reward < 1, since any token list other than the target scores below 1)."""
    out = []
    for p in make_prompts(n, rng, min_len, max_len, exclude):
        chosen, rejected = sorted_answer(p), corrupt(p, rng)
        assert sort_reward(p, rejected) < sort_reward(p, chosen), (p, rejected)  # by construction
        out.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_synthetic(
    out_dir: str | Path, seed: int, n_sft: int = 4000, n_pref_train: int = 6000, n_pref_test: int = 500,
    n_prompts_train: int = 1000, n_prompts_test: int = 200, min_len: int = 3, max_len: int = 6,
) -> dict[str, Path]:  # fmt: skip
    """Write the task's files under `out_dir`; the same seed gives byte-identical files.

    Returns {"sft", "sft_test", "prefs_train", "prefs_test", "prompts_train", "prompts_test",
    "tokenizer_corpus"} -> path. Test prompts are drawn first and excluded from every
    training file, so evaluation never sees a prompt that was trained on.
    """
    _check_lengths(min_len, max_len)
    rng = random.Random(seed)
    prompts_test = make_prompts(n_prompts_test, rng, min_len, max_len)
    prefs_test = make_preferences(n_pref_test, rng, min_len, max_len)
    held_out = frozenset(prompts_test) | {r["prompt"] for r in prefs_test}
    sft = make_sft(n_sft, rng, min_len, max_len, held_out)
    prefs_train = make_preferences(n_pref_train, rng, min_len, max_len, held_out)
    prompts_train = make_prompts(n_prompts_train, rng, min_len, max_len, held_out)

    rows = {
        "sft": sft,
        "prefs_train": prefs_train,
        "prefs_test": prefs_test,
        "prompts_train": [{"prompt": p, "answer": sorted_answer(p)} for p in prompts_train],
        "prompts_test": [{"prompt": p, "answer": sorted_answer(p)} for p in prompts_test],
        # Held-out SFT pairs: the test prompts with their correct answers.
        "sft_test": [{"prompt": p, "response": sorted_answer(p)} for p in prompts_test],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in FILES}
    for name in FILES:
        _write_jsonl(paths[name], rows[name])

    # Every form the models will read or write: prompts, correct and corrupted answers,
    # plus every digit in both contexts (a short run could otherwise miss one).
    every = " ".join("0123456789")
    corpus = [PREFIX + every, every]
    corpus += [line for r in sft for line in (r["prompt"], r["response"])]
    corpus += [line for r in prefs_train for line in (r["prompt"], r["chosen"], r["rejected"])]
    paths["tokenizer_corpus"] = out / "tokenizer_corpus.txt"
    with open(paths["tokenizer_corpus"], "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in corpus)
    return paths


def sort_reward_batch(prompts: list[str], responses: list[str], answers: list | None = None) -> list[float]:
    """`sort_reward` over a batch, in the reward-function form the RL stages call
    (`megarlhf.data.synthetic:sort_reward_batch`). `answers` is unused: the prompt holds
    everything needed to check the response."""
    return [sort_reward(p, r) for p, r in zip(prompts, responses)]
