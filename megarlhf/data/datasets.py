"""Tokenized in-memory datasets for SFT, preference (RM/DPO) and RL-prompt data.

Layer: data/ (imports torch, stdlib, megarlhf.config and data.*; tqdm only when asked for).

Each dataset reads its source once through `data.readers` (JSONL, JSON, Parquet, Arrow,
save_to_disk folders, hub names; rows streamed, columns mapped by `columns`), tokenizes
every record with the chat template, and keeps tensors only.

Length policy (`truncation`), for a sample longer than `max_length`:
  - "error": raise `DataError("file:line: ... has N tokens, max_length is M ...")`;
  - "right": cut the end; a cut that leaves no response token is a bad line (an error, or
    skipped and counted under `on_error="skip"`);
  - "drop": skip the sample and count it.
`num_skipped` counts bad rows skipped under `on_error="skip"` plus dropped samples;
`skip_summary()` breaks them down by reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from megarlhf.config.errors import ConfigError, DataError
from megarlhf.data.chat import Message, Template
from megarlhf.data.jsonl import (
    PREFERENCE_COLUMNS, PROMPT_COLUMNS, SFT_COLUMNS, PreferenceRecord, PromptRecord, RecordError, SFTRecord,
    parse_preference, parse_prompt, parse_sft,
)  # fmt: skip
from megarlhf.data.readers import Location, Records
from megarlhf.data.tokenizer import Tokenizer

TRUNCATIONS = ("error", "right", "drop")
Truncation = Literal["error", "right", "drop"]


class _TooLong(Exception):
    """A sample over max_length under truncation="error": always fatal, never skipped."""


def _fit(ids: list[int], mask: list[int], max_length: int, truncation: str, what: str):
    """Apply the length policy. Returns (ids, mask), or None to drop the sample."""
    n = len(ids)
    if n <= max_length:
        return ids, mask
    if truncation == "error":
        raise _TooLong(
            f"{what} has {n} tokens, max_length is {max_length}; raise max_length, or set "
            "truncation='right' (cut the end) or 'drop' (skip such samples)"
        )
    if truncation == "drop":
        return None
    if not any(mask[:max_length]):
        raise RecordError(f"{what} has {n} tokens; cutting it to max_length={max_length} leaves no response token")
    return ids[:max_length], mask[:max_length]


def _check_options(max_length: int, truncation: str, allowed: tuple[str, ...] = TRUNCATIONS) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length={max_length!r}; expected a positive integer")
    if truncation not in allowed:
        raise ConfigError(f"truncation={truncation!r}; expected one of {allowed}")


class _TokenizedDataset:
    """Items built once from a data source, row by row (rows are read lazily and only the
    tokenized tensors are kept); `locations[i]` is where item i came from."""

    def __init__(
        self, path: str | Path, parse: Callable[[dict], Any], encode: Callable[[Any], dict | None],
        on_error: Literal["error", "skip"], progress: bool, columns: Mapping[str, str] | None, keys: Sequence[str],
    ):  # fmt: skip
        self.source = str(path)
        mapped = {k: v for k, v in (columns or {}).items() if k in keys}
        self.records = Records(path, parse, on_error, mapped)
        self._items: list[dict] = []
        self.locations: list[Location] = []
        desc = f"tokenizing {Path(self.source).name}"
        for where, record in _progress(self.records, progress, desc, self.records.total):
            try:
                item = encode(record)
            except _TooLong as e:
                raise DataError(f"{where}: {e}") from None
            except RecordError as e:
                self.records.reject(where, e)
                continue
            if item is None:
                self.records.drop(where, "over max_length (truncation=drop)")
                continue
            self._items.append(item)
            self.locations.append(where)
        if not self._items:
            raise DataError(f"{self.source}: no usable samples ({self.skip_summary()})")

    @property
    def num_skipped(self) -> int:
        """Rows skipped under on_error="skip" plus samples dropped for their length."""
        return self.records.num_skipped

    def skip_summary(self) -> str:
        """How many rows were left out, by reason, each with the first such row."""
        return self.records.summary()

    @property
    def lines(self) -> list[int]:
        """Line (JSON text) or row (columnar) number of each item."""
        return [where.index for where in self.locations]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        return self._items[i]

    def attach(self, key: str, values: Sequence) -> None:
        """Store `values[i]` in item i under `key` (e.g. DPO's precomputed reference log-probs)."""
        if len(values) != len(self._items):
            raise ValueError(f"{len(values)} values for {len(self._items)} items of {self.source}")
        for item, value in zip(self._items, values):
            item[key] = value


def _progress(records: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return records
    from megarlhf.output import progress_bar  # only the CLI asks for a bar

    return progress_bar(records, desc=desc, unit="sample", total=total)


class SFTDataset(_TokenizedDataset):
    """Items: `{"input_ids": LongTensor[L], "loss_mask": FloatTensor[L]}`, L <= max_length."""

    def __init__(
        self, path: str | Path, tokenizer: Tokenizer, template: Template, max_length: int,
        truncation: Truncation = "error", on_error: Literal["error", "skip"] = "error", progress: bool = False,
        columns: Mapping[str, str] | None = None,
    ):  # fmt: skip
        _check_options(max_length, truncation)
        template.check(tokenizer)  # a bad template is a config error, before any data error

        def encode(record: SFTRecord) -> dict | None:
            ids, mask = template.render(tokenizer, record.messages)
            fitted = _fit(ids, mask, max_length, truncation, "sample")
            if fitted is None:
                return None
            return {"input_ids": torch.tensor(fitted[0], dtype=torch.long),
                    "loss_mask": torch.tensor(fitted[1], dtype=torch.float)}  # fmt: skip

        super().__init__(path, parse_sft, encode, on_error, progress, columns, SFT_COLUMNS)


def _render_completion(tokenizer: Tokenizer, template: Template, prompt: list[Message], completion: list[Message]):
    """Prompt + completion, masked on the completion's assistant tokens only (assistant turns
    inside a multi-turn prompt are context, not the preference being scored)."""
    return template.render(tokenizer, prompt + completion, context_turns=len(prompt))


class PreferenceDataset(_TokenizedDataset):
    """Items: `{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}` (Long, Float);
    masks are 1 on the response tokens (and their EOS)."""

    def __init__(
        self, path: str | Path, tokenizer: Tokenizer, template: Template, max_length: int,
        truncation: Truncation = "error", on_error: Literal["error", "skip"] = "error", progress: bool = False,
        columns: Mapping[str, str] | None = None,
    ):  # fmt: skip
        _check_options(max_length, truncation)
        template.check(tokenizer)

        def encode(record: PreferenceRecord) -> dict | None:
            item = {}
            for side in ("chosen", "rejected"):
                ids, mask = _render_completion(tokenizer, template, record.prompt, getattr(record, side))
                fitted = _fit(ids, mask, max_length, truncation, side)
                if fitted is None:
                    return None  # drop the pair: one side alone is no preference
                item[f"{side}_ids"] = torch.tensor(fitted[0], dtype=torch.long)
                item[f"{side}_mask"] = torch.tensor(fitted[1], dtype=torch.float)
            return item

        super().__init__(path, parse_preference, encode, on_error, progress, columns, PREFERENCE_COLUMNS)


class PromptDataset(_TokenizedDataset):
    """Items: `{"prompt_ids": LongTensor[P], "prompt_text": str (the last user turn),
    "answer": any JSON or None, "meta": dict}`.

    Prompts end with the assistant marker, so truncation "right" is refused: it would cut
    the marker off and ask the policy to continue the user's text.
    """

    def __init__(
        self, path: str | Path, tokenizer: Tokenizer, template: Template, max_length: int,
        truncation: Literal["error", "drop"] = "error", on_error: Literal["error", "skip"] = "error",
        progress: bool = False, columns: Mapping[str, str] | None = None,
    ):  # fmt: skip
        _check_options(max_length, truncation, allowed=("error", "drop"))
        template.check(tokenizer)

        def encode(record: PromptRecord) -> dict | None:
            ids = template.render_prompt(tokenizer, record.prompt)
            if _fit(ids, [0] * len(ids), max_length, truncation, "prompt") is None:  # mask unused: no cut
                return None
            text = record.prompt if isinstance(record.prompt, str) else next(
                (m["content"] for m in reversed(record.prompt) if m["role"] == "user"), ""
            )
            return {
                "prompt_ids": torch.tensor(ids, dtype=torch.long),
                "prompt_text": text,  # the last user turn: what a rule-based reward reads
                "answer": record.answer,
                "meta": record.meta,
            }

        super().__init__(path, parse_prompt, encode, on_error, progress, columns, PROMPT_COLUMNS)
