"""A small verifiable math task: generated arithmetic word problems with worked solutions.

Rows follow verl's GSM8K Parquet schema (what verl's examples/data_preprocess/gsm8k.py
writes), so the same files feed megarlhf and verl:

    data_source   "megarlhf/arithmetic"
    prompt        [{"role": "user", "content": question + INSTRUCTION}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "42"}
    extra_info    {"split", "index", "question", "answer": the worked solution ending "#### 42"}

Problems take one or two steps with small whole numbers (a 135M-parameter model gets some
right, so RL has a signal). Everything is drawn from `random.Random(seed)`; held-out
problems are drawn first and no question appears in both splits. No downloads.
"""

from __future__ import annotations

import random
from collections.abc import Callable

INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max", "Nora", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]


def _buy_more(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 30), r.randint(2, 30)
    q = f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?"
    return q, f"{name} has {a} + {b} = {a + b} {item}.", a + b


def _give_away(r: random.Random) -> tuple[str, str, int]:
    name, friend, item = *r.sample(NAMES, 2), r.choice(ITEMS)
    a = r.randint(10, 50)
    b = r.randint(1, a - 1)
    q = f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?"
    return q, f"{name} has {a} - {b} = {a - b} {item} left.", a - b


def _boxes(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 12)
    q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?"
    return q, f"{a} boxes of {b} {item} make {a} * {b} = {a * b} {item}.", a * b


def _share(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    per, k = r.randint(2, 12), r.randint(2, 6)
    q = f"{name} shares {per * k} {item} equally among {k} friends. How many {item} does each friend get?"
    return q, f"Each friend gets {per * k} / {k} = {per} {item}.", per


def _price(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, p, paid_extra = r.randint(2, 8), r.randint(2, 9), r.randint(1, 20)
    paid = n * p + paid_extra
    q = (f"{name} buys {n} {item} that cost ${p} each and pays with ${paid}. "
         f"How many dollars of change does {name} get?")  # fmt: skip
    return q, f"The {item} cost {n} * {p} = ${n * p}. The change is {paid} - {n * p} = ${paid_extra}.", paid_extra


def _two_days(r: random.Random) -> tuple[str, str, int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, extra = r.randint(3, 25), r.randint(1, 15)
    q = (f"{name} collected {a} {item} on Monday and {extra} more on Tuesday than on Monday. "
         f"How many {item} did {name} collect on the two days together?")  # fmt: skip
    sol = f"On Tuesday {name} collected {a} + {extra} = {a + extra} {item}. Together: {a} + {a + extra} = {2 * a + extra} {item}."
    return q, sol, 2 * a + extra


def _spend(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    start, a, b = r.randint(30, 99), r.randint(2, 12), r.randint(2, 12)
    q = f"{name} has ${start}, spends ${a} on lunch and ${b} on a book. How many dollars does {name} have left?"
    return q, f"{name} spends {a} + {b} = ${a + b}, so {start} - {a + b} = ${start - a - b} are left.", start - a - b


PROBLEMS: list[Callable[[random.Random], tuple[str, str, int]]] = [
    _buy_more, _give_away, _boxes, _share, _price, _two_days, _spend,
]  # fmt: skip


def make_problems(n: int, r: random.Random, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str, int]]:
    """n distinct problems (question, worked solution ending '#### answer', answer)."""
    out, seen = [], set(exclude)
    while len(out) < n:
        q, steps, answer = r.choice(PROBLEMS)(r)
        if q in seen:
            continue
        seen.add(q)
        out.append((q, f"{steps}\n#### {answer}", answer))
    return out


def verl_row(split: str, index: int, question: str, solution: str, answer: int) -> dict:
    return {
        "data_source": "megarlhf/arithmetic",
        "prompt": [{"role": "user", "content": question + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {"split": split, "index": index, "question": question, "answer": solution},
    }


def make_splits(n_train: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows} in verl's schema; test drawn first, disjoint from train."""
    r = random.Random(seed)
    test = make_problems(n_test, r)
    train = make_problems(n_train, r, exclude=frozenset(q for q, _, _ in test))
    return {
        "train": [verl_row("train", i, *p) for i, p in enumerate(train)],
        "test": [verl_row("test", i, *p) for i, p in enumerate(test)],
    }
