#!/usr/bin/env python
"""Train a small sentencepiece tokenizer from text files (one sentence per line).

    python tools/train_tokenizer.py --input data/tokenizer_corpus.txt --vocab-size 64 \
        --output-prefix out/sp --model-type bpe

Writes <output-prefix>.model and <output-prefix>.vocab. Ids: pad=0, unk=1, bos=2, eos=3,
then the chat markers <|user|>, <|assistant|>, <|system|> as single pieces. Digits are
split one per piece, every character of the input is covered, and training is
deterministic (same input, same bytes). --vocab-size is an upper bound: a tiny corpus
yields fewer pieces. Nothing is downloaded. Exit code 2 on bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys

from megarlhf.config.errors import ConfigError
from megarlhf.data.tokenizer import MODEL_TYPES, load_tokenizer, train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files to train on")
    p.add_argument("--vocab-size", type=int, required=True, help="largest vocabulary, special pieces included")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="sentencepiece algorithm (default: bpe)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, args.model_type)
        tok = load_tokenizer(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({tok.vocab_size} pieces; pad={tok.pad_id} bos={tok.bos_id} eos={tok.eos_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
