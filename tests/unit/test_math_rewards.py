"""Verifiable math rewards against hand-written cases: extraction, equivalence, the two
calling conventions (megarlhf's positional, TRL's keywords), the format reward, and the
process timeout that stands in for signal.alarm off the main thread."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import pytest

from megarlhf.config import ConfigError
from megarlhf.rollout.math_rewards import (
    answers_equal, boxed_reward, call_with_timeout, extract_boxed, extract_gsm8k, format_reward, ground_truth,
    gsm8k_flexible_reward, gsm8k_reward, math_reward, parse_number,
)  # fmt: skip
from megarlhf.rollout.rewards import BUILTIN_REWARDS, load_reward_fn

# (response, strict answer, flexible answer), written by hand.
GSM8K_EXTRACTION = [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("#### 7", "7", "7"),
    ("####7", "7", "7"),  # no space after the marker
    ("The loss is 5 - 12 = -7\n#### -7", "-7", "-7"),
    ("Total: 1,234 + 1 = 1,235\n#### 1,235", "1,235", "1,235"),
    ("#### $18", "$18", "$18"),
    ("#### 2.50", "2.50", "2.50"),
    ("#### 3/4", "3/4", "3/4"),
    ("first try #### 5\nno wait, #### 6", "6", "6"),  # multiple ####: the last one counts
    ("The answer is 42.", None, "42"),  # no marker: strict finds nothing, flexible the last number
    ("I don't know.", None, None),
    ("", None, None),
    ("#### seven", None, None),
    ("Costs 20 dollars, then 5 more: 25 dollars in all", None, "25"),
]


@pytest.mark.parametrize("text,strict,flexible", GSM8K_EXTRACTION)
def test_gsm8k_extraction(text, strict, flexible):
    assert extract_gsm8k(text, strict=True) == strict
    assert extract_gsm8k(text, strict=False) == flexible


BOXED = [
    (r"so \boxed{42}", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{{a}{b}{\{c\}}}", r"{a}{b}{\{c\}}"),
    (r"first \boxed{1}, finally \boxed{2}.", "2"),  # the last one
    (r"\fbox{7}", "7"),
    (r"\boxed {  -3 }", "-3"),
    (r"\boxed{12", None),  # unclosed
    ("no box here", None),
]


@pytest.mark.parametrize("text,expected", BOXED)
def test_boxed_extraction(text, expected):
    assert extract_boxed(text) == expected


NUMBERS = [
    ("7", Fraction(7)),
    ("-7", Fraction(-7)),
    ("\u22127", Fraction(-7)),  # typeset minus sign
    ("1,234", Fraction(1234)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("5.50", Fraction(11, 2)),  # trailing zeros
    ("5.", Fraction(5)),  # sentence-final period
    ("0.75", Fraction(3, 4)),
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    (r"\frac{3}{4}", Fraction(3, 4)),
    (r"-\dfrac{10}{4}", Fraction(-5, 2)),
    ("$18", Fraction(18)),
    (r"\$18", Fraction(18)),
    ("50%", Fraction(50)),  # GSM8K writes percent answers as the bare number
    (r"50\%", Fraction(50)),
    (r"18 \text{ dollars}", Fraction(18)),
    ("1{,}000", Fraction(1000)),
    (12, Fraction(12)),
    (0.1, Fraction(1, 10)),  # the decimal a float prints as
    ("1,2", None),  # not a thousands separator
    ("--5", None),
    (float("nan"), None),
    ("1/0", None),
    ("x+1", None),
    ("", None),
    (True, None),
]


@pytest.mark.parametrize("text,value", NUMBERS)
def test_parse_number(text, value):
    assert parse_number(text) == value


EQUAL = [
    ("1,000", "1000", True),
    ("5.50", "5.5", True),
    ("0.75", "3/4", True),
    (r"\frac{6}{8}", "0.75", True),
    ("-3", "3", False),
    ("72", 72, True),
    ("72.0", "72", True),
    ("72.01", "72", False),
    ("$1,234.00", "1234", True),
    (None, "5", False),  # no answer extracted
    ("5", None, False),  # no ground truth
    ("x+1", "x + 1", True),  # non-numbers: normalised strings
    ("x+1", "x+2", False),
]


@pytest.mark.parametrize("predicted,truth,equal", EQUAL)
def test_answers_equal(predicted, truth, equal):
    assert answers_equal(predicted, truth) is equal


@pytest.mark.parametrize(
    "answer,truth",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72"),  # a whole GSM8K solution
        ({"style": "rule", "ground_truth": "1,200"}, "1,200"),  # verl's reward_model column
        (18, "18"),
        (" 7 ", "7"),
        (None, None),
        ({"style": "rule"}, None),
    ],
)
def test_ground_truth_column_shapes(answer, truth):
    assert ground_truth(answer) == truth


RESPONSES = [
    "3 + 4 = 7\n#### 7",  # right, strict format
    "The answer is 7.",  # right number, no format
    r"So the answer is \boxed{7}.",  # right, boxed
    "#### 8",  # wrong
    "#### 6\nActually #### 7",  # multiple: the last is right
]
ANSWERS = ["7", "7", {"ground_truth": "7"}, "#### 7", 7]


def test_rewards_positional_megarlhf_call():
    prompts = ["q"] * len(RESPONSES)
    assert gsm8k_reward(prompts, RESPONSES, ANSWERS) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert gsm8k_flexible_reward(prompts, RESPONSES, ANSWERS) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert boxed_reward(prompts, RESPONSES, ANSWERS) == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert math_reward(prompts, RESPONSES, ANSWERS) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert format_reward(prompts, RESPONSES, ANSWERS) == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_rewards_trl_keyword_call():
    """TRL's GRPOTrainer: keywords, the dataset's columns as lists, conversational
    completions as message lists, extra keywords it passes (completion_ids, trainer_state)."""
    conversational = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    verl_column = [{"style": "rule", "ground_truth": "7"}] * len(RESPONSES)
    got = math_reward(prompts=["q"] * 5, completions=conversational, reward_model=verl_column,
                      completion_ids=[[1]] * 5, trainer_state=None)  # fmt: skip
    assert got == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert gsm8k_reward(prompts=["q"] * 5, completions=RESPONSES, answer=["7"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(TypeError, match="ground truth"):
        gsm8k_reward(prompts=["q"], completions=["#### 7"], label=["7"])


def test_format_reward_needs_the_answer_at_the_end():
    assert format_reward(["q"] * 4, ["#### 7 and then more text", "#### 7  ", r"\boxed{7", "\\boxed{7}."], None) == [
        0.0, 1.0, 0.0, 1.0,
    ]  # fmt: skip


def test_registry_names_load_the_functions():
    assert load_reward_fn("gsm8k") is gsm8k_reward
    assert load_reward_fn("megarlhf.rollout.math_rewards:math_reward") is math_reward
    assert set(BUILTIN_REWARDS) >= {"gsm8k", "gsm8k_flexible", "boxed", "math", "math_format"}
    with pytest.raises(ConfigError, match="gsm8k"):
        load_reward_fn("gsm8")


def _slow(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def _fails():
    raise ValueError("boom")


def test_call_with_timeout_works_off_the_main_thread():
    """signal.alarm raises ValueError off the main thread; the child-process timeout does not."""
    results = {}

    def worker():
        t0 = time.perf_counter()
        results["slow"] = call_with_timeout(_slow, (30.0,), timeout_s=0.5, default="timed out")
        results["slow_s"] = time.perf_counter() - t0
        results["fast"] = call_with_timeout(_slow, (0.0,), timeout_s=20.0, default="timed out")
        results["raises"] = call_with_timeout(_fails, (), timeout_s=20.0, default="failed")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert results["slow"] == "timed out" and results["slow_s"] < 20
    assert results["fast"] == "done"
    assert results["raises"] == "failed"


def test_math_verify_for_symbolic_answers():
    """With math-verify installed (an optional extra), answers that are no plain numbers
    are compared symbolically, in the killable child process."""
    pytest.importorskip("math_verify")
    assert answers_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", use_math_verify=True)
    assert answers_equal("x^2+2x+1", "(x+1)^2", use_math_verify=True)
    assert not answers_equal(r"\pi", "3", use_math_verify=True)
    assert not answers_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")  # without it: strings differ
