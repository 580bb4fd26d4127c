"""Synthetic sorting task: reward against hand-computed cases, preferences, files."""

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from megarlhf.config import ConfigError
from megarlhf.data.jsonl import parse_preference, parse_prompt, parse_sft
from megarlhf.data.readers import read_jsonl
from megarlhf.data.synthetic import make_preferences, make_prompts, make_sft, sort_reward, write_synthetic

SIZES = dict(n_sft=200, n_pref_train=100, n_pref_test=50, n_prompts_train=100, n_prompts_test=50)


@pytest.mark.parametrize(
    "prompt, response, reward",
    [
        ("sort: 7 2 9 4", "2 4 7 9", 1.0),
        ("sort: 7 2 9 4", "2 4 9 7", 2 / 4),  # two positions right
        ("sort: 7 2 9 4", "2 4 7", 3 / 4),  # missing token
        ("sort: 7 2 9 4", "2 4 7 9 9", 4 / 5),  # extra token
        ("sort: 7 2 9 4", "2 x 7 9", 3 / 4),  # non-digit token is wrong
        ("sort: 7 2 9 4", "24 7 9", 0.0),  # "24" is not "2"; the rest is shifted
        ("sort: 7 2 9 4", "  2  4 7 9\n", 1.0),  # whitespace between tokens does not matter
        ("sort: 7 2 9 4", "", 0.0),
        ("sort: 7 2 9 4", "9 7 4 2", 0.0),
        ("sort: 3 3 1", "1 3 3", 1.0),
        ("sort: 3 3 1", "1 3", 2 / 3),
        ("sort: 3 3 1", "3 3 1", 1 / 3),
    ],
)  # fmt: skip
def test_sort_reward_hand_computed(prompt, response, reward):
    assert sort_reward(prompt, response) == pytest.approx(reward)


def test_prompts_have_the_stated_form_and_length_range():
    prompts = make_prompts(2000, random.Random(0), min_len=3, max_len=6)
    lengths = set()
    for p in prompts:
        assert re.fullmatch(r"sort: \d( \d)*", p)
        lengths.add(len(p.split()) - 1)
    assert lengths == {3, 4, 5, 6}


def test_correct_answers_score_one():
    for row in make_sft(500, random.Random(1)):
        digits = row["prompt"].split()[1:]
        assert row["response"].split() == sorted(digits)  # naive oracle
        assert sort_reward(row["prompt"], row["response"]) == 1.0


def test_rejected_always_scores_below_chosen_and_all_corruptions_occur():
    kinds = set()
    for row in make_preferences(1000, random.Random(2)):
        chosen, rejected, given = row["chosen"].split(), row["rejected"].split(), row["prompt"].split()[1:]
        assert sort_reward(row["prompt"], row["rejected"]) < sort_reward(row["prompt"], row["chosen"]) == 1.0
        swaps = [chosen[:i] + [chosen[i + 1], chosen[i]] + chosen[i + 2 :] for i in range(len(chosen) - 1)]
        if len(rejected) != len(chosen):
            kinds.add("drop" if len(rejected) < len(chosen) else "duplicate")
        elif sorted(rejected) != chosen:
            kinds.add("replace")
        elif rejected in swaps:
            kinds.add("swap")  # (an unsorted prompt one swap from sorted also lands here)
        else:
            assert rejected == given
            kinds.add("unsorted")
    assert kinds == {"drop", "duplicate", "replace", "swap", "unsorted"}


def test_lengths_below_two_are_refused():
    with pytest.raises(ConfigError, match="need 2 <= min_len <= max_len"):
        make_prompts(1, random.Random(0), min_len=1, max_len=3)


def read_all(paths):
    return {name: Path(p).read_bytes() for name, p in paths.items()}


def test_write_synthetic_is_byte_deterministic(tmp_path):
    a = read_all(write_synthetic(tmp_path / "a", seed=3, **SIZES))
    b = read_all(write_synthetic(tmp_path / "b", seed=3, **SIZES))
    c = read_all(write_synthetic(tmp_path / "c", seed=4, **SIZES))
    assert set(a) == {"sft", "sft_test", "prefs_train", "prefs_test", "prompts_train", "prompts_test", "tokenizer_corpus"}
    assert a == b
    assert all(a[k] != c[k] for k in a)


def test_files_parse_and_test_prompts_are_held_out(tmp_path):
    paths = write_synthetic(tmp_path, seed=0, **SIZES)
    loaded = {}
    for name, parse in [("sft", parse_sft), ("prefs_train", parse_preference), ("prefs_test", parse_preference),
                        ("prompts_train", parse_prompt), ("prompts_test", parse_prompt)]:  # fmt: skip
        records, skipped = read_jsonl(paths[name], parse)
        assert skipped == 0 and len(records) == SIZES["n_" + name.replace("prefs", "pref")]
        loaded[name] = [json.loads(line) for line in paths[name].read_text().splitlines()]
    train = {r["prompt"] for k in ("sft", "prefs_train", "prompts_train") for r in loaded[k]}
    test = {r["prompt"] for k in ("prefs_test", "prompts_test") for r in loaded[k]}
    assert train and test and not train & test
    for r in loaded["prompts_test"] + loaded["prompts_train"]:
        assert r["answer"] == " ".join(sorted(r["prompt"].split()[1:]))
    corpus = set(paths["tokenizer_corpus"].read_text().splitlines())
    assert {r["response"] for r in loaded["sft"]} <= corpus and set("0123456789") <= set("".join(corpus))


def test_make_synthetic_cli(tmp_path, capsys):
    path = Path(__file__).parents[2] / "examples" / "data" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--out", str(tmp_path), "--seed", "1", "--n-sft", "10", "--n-pref-train", "5", "--n-pref-test", "5",
            "--n-prompts-train", "5", "--n-prompts-test", "5"]  # fmt: skip
    assert tool.main(args) == 0
    assert "sft.jsonl (10 lines)" in capsys.readouterr().out
    assert len((tmp_path / "prompts_test.jsonl").read_text().splitlines()) == 5
    assert tool.main(args + ["--min-len", "1"]) == 2
