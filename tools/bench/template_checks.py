#!/usr/bin/env python
"""What the chat template's load-time mask checks cost: tokenize N conversations with a model's
Jinja template, with the checks (megarlhf's default) and without, and transformers'
apply_chat_template on the same conversations for scale.

    PYTHONPATH=. python tools/bench/template_checks.py                     # the tests' ChatML tokenizer
    PYTHONPATH=. python tools/bench/template_checks.py --style generation  # {% generation %} blocks
    PYTHONPATH=. python tools/bench/template_checks.py --tokenizer /models/SmolLM2-135M-Instruct

Conversations: 1-3 user/assistant exchanges of 4-30 words (seeded). "checks off" still renders
the growing prefixes (the mask needs them) and checks prefix preservation (a string compare);
it skips what data/template.py lists as checks 2-4: tokenizing the whole render once more and
comparing ids, the EOS-in-mask and double-BOS checks. One process, one thread; CPU seconds
(process time) are reported next to wall seconds, as they hold on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("what is two plus sort these numbers the sorted are hello how can I help you today tell me a joke why "
         "did chicken cross road yes no thanks good bye 1 2 3 4 5 6 7 8 9").split()  # fmt: skip


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 30)))})
        out.append(msgs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, help="an HF tokenizer folder with a chat template")
    p.add_argument("--style", default="chatml", help="tests/hf_fixtures.py style built when --tokenizer is not given")
    p.add_argument("-n", type=int, default=10_000, help="conversations (default 10000)")
    args = p.parse_args(argv)

    from megarlhf.data import load_tokenizer
    from megarlhf.data.template import JinjaChatTemplate

    folder = args.tokenizer
    if folder is None:
        from tests.hf_fixtures import hf_tokenizer

        folder = hf_tokenizer(Path(tempfile.mkdtemp()) / args.style, args.style)
    tok = load_tokenizer(folder)
    convs = conversations(args.n)
    tokens = 0
    results = {}
    for name, verify in (("checks on", True), ("checks off", False)):
        template = JinjaChatTemplate(tok.chat_template, tok.template_origin, verify=verify)
        template.render(tok, convs[0])  # compile the template, build the tokenizer copy
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(len(template.render(tok, c)[0]) for c in convs)
        results[name] = (time.perf_counter() - t0, time.process_time() - c0)
    from tests.hf_fixtures import transformers_tokenizer

    oracle = transformers_tokenizer(folder)
    generation = JinjaChatTemplate(tok.chat_template, "").generation
    t0, c0 = time.perf_counter(), time.process_time()
    for c in convs:
        oracle.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=generation)
    results["transformers apply_chat_template" + (" (+ assistant mask)" if generation else " (no mask)")] = (
        time.perf_counter() - t0, time.process_time() - c0
    )
    mode = "{% generation %} blocks" if generation else "growing prefixes"
    print(f"{args.n} conversations, {tokens} tokens, template {tok.template_origin} (masks from {mode})")
    print(f"  {'':45s} {'wall s':>8s} {'CPU s':>8s} {'conv/CPU s':>11s}")
    for name, (wall, cpu) in results.items():
        print(f"  {name:45s} {wall:8.2f} {cpu:8.2f} {args.n / cpu:11.0f}")
    on, off = results["checks on"], results["checks off"]
    print(f"  checks on / checks off = {on[1] / off[1]:.2f} (CPU), {on[0] / off[0]:.2f} (wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
