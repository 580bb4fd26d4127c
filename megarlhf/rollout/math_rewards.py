"""Verifiable math rewards: extract a final answer, compare it with the ground truth.

Layer: rollout/ (pure Python: re, fractions, multiprocessing; `math-verify` only when
installed and asked for). The reward functions take either calling convention:

    megarlhf:  fn(prompts, responses, answers)                   (RewardFn, positional)
    TRL:       fn(prompts=..., completions=..., answer=[...], ...) (GRPOTrainer, keywords)

`answers[i]` / the answer column is the ground truth in any of the shapes data carries it:
a number, a string ("72", "1,234", "3/4"), a whole GSM8K solution ending in "#### 72", or
verl's `reward_model` dict `{"style": "rule", "ground_truth": "72"}`. A TRL call reads the
first column present of `answer`, `ground_truth`, `solution`, `reward_model`.

Extraction (the model's final answer):
- GSM8K strict: the number after the LAST "#### " (a response that restates the marker is
  judged by its final one); nothing else counts, so the format is part of the reward.
- GSM8K flexible: the last number anywhere in the response.
- boxed: the content of the last \\boxed{...} or \\fbox{...} (nested braces balanced).

Equivalence: both sides parse to exact rationals (`fractions.Fraction`): thousands commas
("1,234"), a leading "$" or trailing "%" / "." / units-free text like "\\$", trailing zeros
("5.50" == "5.5"), fractions ("3/4", "\\frac{3}{4}"), negatives ("-7", "−7"); so "0.75" ==
"3/4" exactly, with no float tolerance to tune. A percent sign is dropped, not divided by
100: GSM8K writes the answer to "what percent ..." as the bare number. Answers that are not
numbers compare as normalised strings, or with math-verify when `use_math_verify`.

math-verify (optional) guards its sympy calls with `signal.alarm`, which only works on a
process's main thread; here it runs in a child process that is killed at the timeout, so
it works from any thread of any rank (`call_with_timeout`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

_CLIP_CHARS = 600
"""Only the response's last characters are searched for the flexible (last-number) answer:
a regex over a pathological multi-kilobyte response stays cheap."""

_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_STRICT = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\{,\}|\\\$|\\%|\^\{?\\circ\}?|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}")


# --- extraction ------------------------------------------------------------------------------
def extract_gsm8k(text: str, strict: bool = True) -> str | None:
    """The final answer of a GSM8K-style response, as written (None when there is none).

    strict: the number after the last "####"; flexible: the last number in the text.
    >>> extract_gsm8k("3 + 4 = 7\\n#### 7")
    '7'
    """
    if strict:
        found = _STRICT.findall(text)
    else:
        found = _ANY_NUMBER.findall(text[-_CLIP_CHARS:])
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or
    unclosed. `\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "strict": lambda t: extract_gsm8k(t, strict=True),
    "flexible": lambda t: extract_gsm8k(t, strict=False),
    "boxed": extract_boxed,
}
"""How a final answer is read from a response, by name."""


# --- equivalence -----------------------------------------------------------------------------
def _clean(s: str) -> str:
    s = s.strip().replace("\u2212", "-")  # U+2212 minus sign, as typeset
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _LATEX_NOISE.sub("", s)
    s = s.replace("$", "").replace(" ", "")
    return s.rstrip(".%")


def parse_number(s: str | int | float) -> Fraction | None:
    """The exact value of a written number, or None when `s` is not one.

    Accepts thousands commas (only in groups of three: "1,234", not "1,2"), a dollar sign,
    a trailing percent sign or period, decimals, "a/b" and \\frac{a}{b}, a leading minus.
    """
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return Fraction(s)
    if isinstance(s, float):
        # the decimal the float prints as, not its binary expansion; nan/inf are no answer
        return Fraction(repr(s)) if math.isfinite(s) else None
    t = _clean(str(s))
    neg = t.startswith("-")
    t = t[1:] if neg else t
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"\(?(\d+(?:\.\d+)?|\.\d+)\)?(?:/\(?(\d+(?:\.\d+)?)\)?)?", t)
    if not m:
        return None
    value = Fraction(m.group(1))
    if m.group(2) is not None:
        denominator = Fraction(m.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return -value if neg else value


def answers_equal(predicted: str | None, truth: Any, use_math_verify: bool = False, timeout_s: float = 5.0) -> bool:
    """Whether a predicted final answer equals the ground truth: as exact numbers when both
    parse as numbers, else as normalised strings (or by math-verify when asked)."""
    if predicted is None:
        return False
    truth = ground_truth(truth)
    if truth is None:
        return False
    a, b = parse_number(predicted), parse_number(truth)
    if a is not None and b is not None:
        return a == b
    if _clean(predicted) == _clean(truth):
        return True
    if use_math_verify:
        import math_verify  # noqa: F401 (imported here once, so each forked child starts with it loaded)

        return bool(call_with_timeout(_math_verify, (predicted, truth), timeout_s, default=False))
    return False


def ground_truth(answer: Any) -> str | None:
    """The reference answer from a data row's answer column: a number or string, a GSM8K
    solution ending in "#### N" (-> "N"), or verl's {"ground_truth": ...} dict."""
    if isinstance(answer, dict):
        answer = answer.get("ground_truth")
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return str(answer)
    answer = str(answer)
    if "####" in answer:
        return extract_gsm8k(answer, strict=True)
    return answer.strip() or None


# --- math-verify in a killable child process ----------------------------------------------------
def _math_verify(predicted: str, truth: str) -> bool:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its timeout is off

    # Timeouts off inside the child (they use signal.alarm); the parent kills the child instead.
    # The extracted answers are bare LaTeX: math-verify finds LaTeX inside $...$ delimiters.
    gold = parse(f"${truth}$", parsing_timeout=None)
    pred = parse(f"${predicted}$", parsing_timeout=None)
    return bool(verify(gold, pred, timeout_seconds=None))


def _serve(conn) -> None:
    """The worker process: answer (fn, args) requests until the pipe closes."""
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, fn(*args)))
        except BaseException as err:  # reported to the parent, which returns the default
            conn.send((False, repr(err)))


class _Worker:
    """One long-lived child process per calling process (each rank has its own), replaced
    only when a call times out: a check costs a round trip through a pipe, not a fork."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join()
            self.conn.close()
        self.proc = self.conn = None

    def call(self, fn: Callable, args: tuple, timeout_s: float, default: Any) -> Any:
        with self.lock:
            if self.proc is None or not self.proc.is_alive():
                self._stop()
                self._start()
            try:
                self.conn.send((fn, args))
                if self.conn.poll(timeout_s):
                    ok, value = self.conn.recv()
                    return value if ok else default
            except (EOFError, BrokenPipeError, OSError):  # the worker died mid-call
                pass
            self._stop()  # timed out (or died): kill it, a fresh one serves the next call
            return default


_WORKER = _Worker()


def call_with_timeout(fn: Callable, args: tuple, timeout_s: float, default: Any = None) -> Any:
    """fn(*args) in a child process, killed after timeout_s seconds -> `default` (also when
    fn raises). Unlike `signal.alarm` this works from any thread, e.g. inside a worker rank's
    scoring thread. The child is forked where the platform allows (it starts with what the
    parent imported) and serves later calls too; only a timeout replaces it. `fn` must be a
    module-level function (it is pickled to the child)."""
    return _WORKER.call(fn, args, timeout_s, default)


def math_verify_available() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


# --- reward functions ---------------------------------------------------------------------------
ANSWER_COLUMNS = ("answer", "ground_truth", "solution", "reward_model")
"""Columns a TRL-style call may carry the ground truth in, first found wins."""


def _texts(completions: Sequence) -> list[str]:
    """Completions as strings: TRL's conversational ones are message lists."""
    out = []
    for c in completions:
        if isinstance(c, list):  # [{"role": "assistant", "content": ...}]
            c = "".join(m.get("content", "") for m in c if isinstance(m, dict))
        out.append(str(c))
    return out


def _unpack(prompts, completions, answers, columns) -> tuple[list[str], list[Any]]:
    if completions is None:
        completions = columns.pop("responses", None)
    if completions is None:
        raise TypeError("a math reward needs the completions (responses) to score")
    texts = _texts(completions)
    if answers is None:
        answers = next((columns[k] for k in ANSWER_COLUMNS if columns.get(k) is not None), None)
    if answers is None:
        raise TypeError(
            f"a math reward needs the ground truth: pass answers (megarlhf) or one of the columns {ANSWER_COLUMNS} (TRL)"
        )
    if len(answers) != len(texts):
        raise ValueError(f"{len(texts)} completions but {len(answers)} answers")
    return texts, list(answers)


def score_answers(texts: Sequence[str], answers: Sequence[Any], extract: Sequence[str] = ("boxed", "strict"),
                  use_math_verify: bool = False, timeout_s: float = 5.0) -> list[float]:  # fmt: skip
    """1.0 per response whose final answer (the first of `extract`'s extractors that finds
    one) equals its ground truth, else 0.0."""
    unknown = [e for e in extract if e not in EXTRACTORS]
    if unknown:
        raise ValueError(f"unknown extractor(s) {unknown}; expected names from {sorted(EXTRACTORS)}")
    scores = []
    for text, truth in zip(texts, answers):
        predicted = next((p for p in (EXTRACTORS[e](text) for e in extract) if p is not None), None)
        scores.append(float(answers_equal(predicted, truth, use_math_verify, timeout_s)))
    return scores


def gsm8k_reward(prompts=None, completions=None, answers=None, **columns) -> list[float]:
    """Correctness under GSM8K's strict format: the number after the last '####'."""
    texts, truths = _unpack(prompts, completions, answers, columns)
    return score_answers(texts, truths, extract=("strict",))


def gsm8k_flexible_reward(prompts=None, completions=None, answers=None, **columns) -> list[float]:
    """Correctness of the last number in the response (no format needed)."""
    texts, truths = _unpack(prompts, completions, answers, columns)
    return score_answers(texts, truths, extract=("flexible",))


def boxed_reward(prompts=None, completions=None, answers=None, **columns) -> list[float]:
    """Correctness of the last \\boxed{} answer; math-verify for non-numbers when installed."""
    texts, truths = _unpack(prompts, completions, answers, columns)
    return score_answers(texts, truths, extract=("boxed",), use_math_verify=math_verify_available())


def math_reward(prompts=None, completions=None, answers=None, **columns) -> list[float]:
    """Correctness of the final answer in either format: \\boxed{} if present, else '####'."""
    texts, truths = _unpack(prompts, completions, answers, columns)
    return score_answers(texts, truths, extract=("boxed", "strict"), use_math_verify=math_verify_available())


_FORMAT_TAIL = re.compile(r"####\s*(?:" + _NUMBER + r")\s*$|\\boxed\s*\{.*\}[\s.$]*$", re.DOTALL)


def has_answer_format(text: str) -> bool:
    """The response ends with its final answer: '#### N' or a \\boxed{...} (then maybe a period)."""
    return bool(_FORMAT_TAIL.search(text.strip())) and (
        "\\boxed" not in text or extract_boxed(text) is not None
    )


def format_reward(prompts=None, completions=None, answers=None, **columns) -> list[float]:
    """1.0 per response that ends with a final answer in the expected format, right or
    wrong (shaping reward; add it to a correctness reward with a small weight)."""
    if completions is None:
        completions = columns.pop("responses", None)
    return [float(has_answer_format(t)) for t in _texts(completions or [])]
