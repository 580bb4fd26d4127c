"""Tokenizers: one small protocol over sentencepiece `.model` and Hugging Face `tokenizer.json`.

Layer: data/ (imports stdlib, sentencepiece, tokenizers and megarlhf.config only).
Everything above this layer sees only `Tokenizer`; which library sits behind it is decided
once, by `load_tokenizer(path)`. Special ids (BOS, EOS, PAD) are looked up by their piece
strings in both backends, so a wrong or missing piece fails at load time with its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from megarlhf.config.errors import ConfigError

CHAT_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
"""Role-marker pieces of the default chat template; `train_sentencepiece` makes each one a
single piece, so a role switch costs one token and cannot be split by the tokenizer."""

MODEL_TYPES = ("bpe", "unigram")


class Tokenizer(Protocol):
    """What the rest of megarlhf needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (the chat template adds them)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special ids (BOS, EOS, PAD) skipped."""
        ...

    def token_to_id(self, piece: str) -> int | None:
        """Id of a single piece, or None when the vocabulary has no such piece."""
        ...


def _special_ids(tok, path: Path, bos: str, eos: str, pad: str) -> tuple[int, int, int]:
    """Look up BOS/EOS/PAD by piece; a missing PAD falls back to EOS (Llama-style vocabularies
    have none). PAD must be a special piece: padding is then never confused with text."""
    ids = {}
    for name, piece in (("BOS", bos), ("EOS", eos)):
        ids[name] = tok.token_to_id(piece)
        if ids[name] is None:
            raise ConfigError(
                f"{path}: tokenizer has no {name} piece {piece!r}; pass the piece this "
                f"vocabulary uses for {name} (e.g. {name.lower()}='<|endoftext|>')"
            )
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        pad_id = ids["EOS"]
    if not tok._is_special(pad_id):
        raise ConfigError(
            f"{path}: pad piece {tok._piece(pad_id)!r} (id {pad_id}) is an ordinary text token, "
            "so padding could not be told apart from text; use a control/special piece for pad"
        )
    return ids["BOS"], ids["EOS"], pad_id


class SentencePieceTokenizer:
    """A sentencepiece `.model` file."""

    def __init__(self, path: str | Path, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = _special_ids(self, self.path, bos, eos, pad)
        self._skip = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._skip])

    def token_to_id(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for an unknown piece; only an exact match counts.
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _is_special(self, i: int) -> bool:
        return self._sp.is_control(i)

    def _piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library)."""

    def __init__(self, path: str | Path, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        self._tok = _HFTok.from_file(str(self.path))
        # Special pieces typed literally in user text stay text: data cannot inject an EOS
        # or a role marker, and PAD never comes out of encode().
        self._tok.encode_special_tokens = True
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = _special_ids(self, self.path, bos, eos, pad)
        self._skip = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._skip], skip_special_tokens=True)

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def _is_special(self, i: int) -> bool:
        return i in self._special

    def _piece(self, i: int) -> str:
        return self._tok.id_to_token(i)


def load_tokenizer(path: str | Path, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>") -> Tokenizer:
    """Open `path`: a `.model` (sentencepiece), a `.json` (Hugging Face), or a directory holding
    `tokenizer.json` or `tokenizer.model` (the former wins, as in transformers)."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in ("tokenizer.json", "tokenizer.model") if (p / name).is_file()]
        if not found:
            raise ConfigError(f"{p}: directory has neither tokenizer.json nor tokenizer.model")
        p = found[0]
    if not p.is_file():
        raise ConfigError(
            f"{p}: no such tokenizer file; expected a sentencepiece .model, a Hugging Face "
            "tokenizer.json, or a directory holding one (tools/train_tokenizer.py makes a .model)"
        )
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, bos, eos, pad)
    if p.suffix == ".json":
        return HFTokenizer(p, bos, eos, pad)
    raise ConfigError(
        f"{p}: unknown tokenizer type {p.suffix!r}; expected .model (sentencepiece) or .json (Hugging Face)"
    )


def train_sentencepiece(
    inputs: Sequence[str | Path], output_prefix: str | Path, vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a sentencepiece model on text files; returns the path of `<output_prefix>.model`.

    Ids: pad=0, unk=1, bos=2, eos=3, then the chat markers as single pieces. `vocab_size` is an
    upper bound (`hard_vocab_limit=False`): a tiny corpus such as the sorting task has fewer
    distinct pieces than asked for, and that is not an error. Deterministic: one thread, the
    whole corpus (no sentence sampling).
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
    missing = [str(f) for f in inputs if not Path(f).is_file()]
    if not inputs or missing:
        raise ConfigError(f"tokenizer training input files not found: {missing or '(none given)'}")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in inputs),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            split_digits=True,  # numbers are read digit by digit: arithmetic/sorting stay learnable
            character_coverage=1.0,  # small corpora: never map a seen character to <unk>
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            user_defined_symbols=[CHAT_MARKERS[r] for r in ("user", "assistant", "system")],
            num_threads=1,  # multi-threaded training is not byte-for-byte reproducible
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )  # fmt: skip
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece training on {[str(f) for f in inputs]} failed: {e}") from e
    return f"{prefix}.model"
