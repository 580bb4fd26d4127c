"""Tokenizers: one small protocol over sentencepiece `.model` and Hugging Face `tokenizer.json`.

Layer: data/ (imports stdlib, sentencepiece, tokenizers and megarlhf.config only).
Everything above this layer sees only `Tokenizer`; which library sits behind it is decided
once, by `load_tokenizer(path)`. Special ids (BOS, EOS, PAD) are looked up by their piece
strings in both backends, so a wrong or missing piece fails at load time with its name and the
config field that overrides it (data.bos_token / eos_token / pad_token). For a Hugging Face
folder the pieces, the extra EOS ids and the chat template come from its files.
"""

from __future__ import annotations

import json
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
    bos_id: int | None
    """None for a model without BOS (Qwen2)."""
    eos_id: int
    eos_ids: tuple[int, ...]
    """Every id that ends a generation: `eos_id` first, then generation_config.json's
    `eos_token_id` (a list for Llama-3: <|end_of_text|>, <|eot_id|>)."""
    pad_id: int
    chat_template: str | None
    """The model's own Jinja chat template (tokenizer_config.json or chat_template.jinja)."""
    template_origin: str
    """Where `chat_template` came from (for messages)."""
    special_tokens: dict[str, str]
    """bos_token/eos_token/pad_token/unk_token pieces: what transformers passes to the template."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special pieces typed in the text stay text."""
        ...

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat template: special pieces written in the text are
        special tokens and nothing is added (what transformers' apply_chat_template does)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special ids (BOS, EOS, PAD) skipped."""
        ...

    def token_to_id(self, piece: str) -> int | None:
        """Id of a single piece, or None when the vocabulary has no such piece."""
        ...

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (for error messages)."""
        ...


NO_BOS = "none"
"""data.bos_token value for a vocabulary without BOS."""


def _special_ids(tok, path: Path, bos: str | None, eos: str | None, pad: str | None,
                 extra_eos: Sequence[int] = (), pad_fallback: bool = True) -> None:
    """Set tok.bos_id / eos_id / eos_ids / pad_id from pieces (None = none named).

    BOS may be absent (None). EOS falls back to the first of `extra_eos` (generation_config.json).
    A PAD that is not named (or, with `pad_fallback`, not in the vocabulary) is EOS: collation
    finds padding from lengths, never by comparing with pad_id, so EOS stays a target. PAD must
    be a special piece: padding is then never confused with text."""
    def lookup(name: str, piece: str, key: str) -> int:
        i = tok.token_to_id(piece)
        if i is None:
            raise ConfigError(
                f"{path}: tokenizer has no {name} piece {piece!r}; set {key} to the piece this "
                f"vocabulary uses for {name}" + (f" (or {key}={NO_BOS} for a model without BOS)" if name == "BOS" else "")
            )
        return i

    tok.bos_id = None if bos in (None, NO_BOS) else lookup("BOS", bos, "data.bos_token")
    if eos is not None:
        tok.eos_id = lookup("EOS", eos, "data.eos_token")
    elif extra_eos:
        tok.eos_id = int(extra_eos[0])
    else:
        raise ConfigError(
            f"{path}: no EOS token: neither tokenizer_config.json / special_tokens_map.json (eos_token) nor "
            "generation_config.json (eos_token_id) names one; set data.eos_token to the piece that ends an answer"
        )
    tok.eos_ids = tuple(dict.fromkeys([tok.eos_id, *(int(i) for i in extra_eos)]))
    pad_id = tok.token_to_id(pad) if pad is not None else None
    if pad_id is None:
        if pad is not None and not pad_fallback:
            lookup("PAD", pad, "data.pad_token")
        pad_id = tok.eos_id
    if not tok._is_special(pad_id):
        raise ConfigError(
            f"{path}: pad piece {tok.id_to_piece(pad_id)!r} (id {pad_id}) is an ordinary text token, so padding "
            "could not be told apart from text; set data.pad_token to a control/special piece"
        )
    tok.pad_id = pad_id


class SentencePieceTokenizer:
    """A sentencepiece `.model` file (megarlhf's own convention: <s>, </s>, <pad>)."""

    chat_template = None
    template_origin = ""
    has_config = False

    def __init__(self, path: str | Path, bos: str | None = None, eos: str | None = None, pad: str | None = None):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self._sp.get_piece_size()
        explicit_pad = pad is not None
        _special_ids(self, self.path, "<s>" if bos is None else bos, eos or "</s>", pad or "<pad>",
                     pad_fallback=not explicit_pad)  # fmt: skip
        self._skip = {self.bos_id, self.pad_id, *self.eos_ids} - {None}
        self.special_tokens = {k: self._sp.id_to_piece(i) for k, i in
                               (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
                               if i is not None}  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    encode_rendered = encode  # user-defined symbols (the role markers) are matched in text

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._skip])

    def token_to_id(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for an unknown piece; only an exact match counts.
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def _is_special(self, i: int) -> bool:
        return self._sp.is_control(i)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def _piece(value) -> str | None:
    """A special-token entry: a string, or an AddedToken dict {"content": ...}; None if unset."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> tuple[str | None, str]:
    """(template source, where it came from): tokenizer_config.json's chat_template (a string,
    or a list of {name, template}, whose 'default' is used), else chat_template.jinja."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"], f"{folder / 'tokenizer_config.json'} (chat_template 'default')"
        value = None
    if isinstance(value, str) and value:
        return value, f"{folder / 'tokenizer_config.json'} (chat_template)"
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    return None, ""


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), with the files saved next to
    it by `save_pretrained`: tokenizer_config.json (special tokens, chat_template),
    special_tokens_map.json (its entries win, as in transformers), chat_template.jinja and
    generation_config.json (every `eos_token_id` stops generation). A bare tokenizer.json
    with none of them uses megarlhf's own pieces <s>, </s>, <pad>."""

    def __init__(self, path: str | Path, bos: str | None = None, eos: str | None = None, pad: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        folder = self.path.parent
        self._tok = _HFTok.from_file(str(self.path))
        self._rendered = None  # a second copy that parses special pieces, made on first use
        # Special pieces typed literally in user text stay text: data cannot inject an EOS
        # or a role marker, and PAD never comes out of encode().
        self._tok.encode_special_tokens = True
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(folder / "tokenizer_config.json")
        self.has_config = bool(config)
        """Whether save_pretrained's files name the special tokens (else megarlhf's own pieces)."""
        named = {**config, **_read_json(folder / "special_tokens_map.json")}
        generation = _read_json(folder / "generation_config.json")
        extra_eos = generation.get("eos_token_id")
        extra_eos = [] if extra_eos is None else extra_eos if isinstance(extra_eos, list) else [extra_eos]
        if config:  # files from save_pretrained: they name the pieces
            from_files = {k: _piece(named.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        else:  # a bare tokenizer.json: megarlhf's own convention
            from_files = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": None}
        pieces = {"bos": from_files["bos"] if bos is None else bos, "eos": from_files["eos"] if eos is None else eos,
                  "pad": from_files["pad"] if pad is None else pad}  # fmt: skip
        _special_ids(self, self.path, pieces["bos"], pieces["eos"], pieces["pad"], extra_eos=extra_eos,
                     pad_fallback=pad is None and not config)  # fmt: skip
        self._skip = {self.bos_id, self.pad_id, *self.eos_ids} - {None}
        # What transformers passes to the template as **special_tokens_map (set tokens only).
        self.special_tokens = {"eos_token": self.id_to_piece(self.eos_id)}
        if self.bos_id is not None:
            self.special_tokens["bos_token"] = self.id_to_piece(self.bos_id)
        if pieces["pad"] is not None:
            self.special_tokens["pad_token"] = self.id_to_piece(self.pad_id)
        if from_files["unk"] is not None:
            self.special_tokens["unk_token"] = from_files["unk"]
        self.chat_template, self.template_origin = _chat_template(folder, config)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> list[int]:
        if self._rendered is None:
            from tokenizers import Tokenizer as _HFTok

            self._rendered = _HFTok.from_file(str(self.path))
        return self._rendered.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._skip], skip_special_tokens=True)

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def _is_special(self, i: int) -> bool:
        return i in self._special


def load_tokenizer(path: str | Path, bos: str | None = None, eos: str | None = None,
                   pad: str | None = None) -> Tokenizer:  # fmt: skip
    """Open `path`: a `.model` (sentencepiece), a `.json` (Hugging Face), or a directory holding
    `tokenizer.json` or `tokenizer.model` (the former wins, as in transformers). `bos`, `eos`,
    `pad` name pieces that override the tokenizer's files (data.bos_token, ...; None = the
    files'; bos 'none' = no BOS)."""
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
        if (p.parent / "tokenizer_config.json").is_file():
            # transformers' sentencepiece tokenizers split special pieces out of the text and
            # add prefix spaces by rules of their own; rather than guess them, ask for the
            # tokenizer.json that transformers itself writes.
            raise ConfigError(
                f"{p}: a Hugging Face folder with a sentencepiece tokenizer.model and no tokenizer.json; write "
                f"one with: python -c \"from transformers import AutoTokenizer as A; "
                f"A.from_pretrained('{p.parent}').save_pretrained('{p.parent}')\""
            )
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
