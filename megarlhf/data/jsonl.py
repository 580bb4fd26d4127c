"""JSONL reading and record validation: every bad line is named by `file:line` and reason.

Layer: data/ (imports stdlib, megarlhf.config and data.chat only).

`read_jsonl` owns the file and the line numbers; a parser owns one record's schema and
raises `RecordError("what is wrong")`, to which `read_jsonl` prepends `file:line:`. Under
`on_error="skip"` a bad line is dropped and counted; the count is returned so callers
report it (nothing is skipped silently).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from megarlhf.config.errors import ConfigError, DataError
from megarlhf.data.chat import ROLES, Message, pair_to_messages

T = TypeVar("T")
ON_ERROR = ("error", "skip")


class RecordError(ValueError):
    """One record is malformed; the message says what is wrong (no file or line yet)."""


def read_jsonl(
    path: str | Path, parse: Callable[[dict], T], on_error: Literal["error", "skip"] = "error"
) -> tuple[list[tuple[int, T]], int]:
    """Parse each non-blank line of `path` with `parse`.

    Returns ([(line_number, record), ...], number_of_skipped_lines). Line numbers are
    1-based and travel with the records so later stages (tokenization, length checks) can
    still point at the line.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a JSONL file, one JSON object per line)")
    records: list[tuple[int, T]] = []
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue  # blank lines (e.g. a trailing newline) are not records
                obj = _loads(text)
                records.append((lineno, parse(obj)))
            except (RecordError, UnicodeDecodeError) as e:
                if on_error == "error":
                    raise DataError(f"{path}:{lineno}: {_reason(e)}") from e
                skipped += 1
    return records, skipped


def _loads(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _reason(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {e.start} of the line)"
    return str(e)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(obj: dict, key: str) -> Any:
    if key not in obj:
        raise RecordError(f"missing key {key!r} (keys present: {sorted(obj)})")
    return obj[key]


def _text(obj: dict, key: str) -> str:
    """A required, non-empty string field."""
    value = _field(obj, key)
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {_json_type(value)}")
    if not value:
        raise RecordError(f"{key!r} is an empty string")
    return value


def _messages(value: Any, key: str) -> list[Message]:
    """A non-empty list of {"role", "content"} objects (other keys in a message are ignored)."""
    if not isinstance(value, list):
        raise RecordError(f"{key!r} must be an array of messages, got {_json_type(value)}")
    if not value:
        raise RecordError(f"{key!r} is an empty array")
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object with 'role' and 'content', got {_json_type(m)}")
        for k in ("role", "content"):
            if k not in m:
                raise RecordError(f"{where}: missing key {k!r}")
        if m["role"] not in ROLES:
            raise RecordError(f"{where}.role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise RecordError(f"{where}.content must be a string, got {_json_type(m['content'])}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answering(value: Any, key: str) -> list[Message]:
    """Messages that contain an answer to learn from."""
    messages = _messages(value, key)
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise RecordError(f"{key!r} has no assistant message with non-empty content (nothing to learn from)")
    return messages


def _completion(obj: dict, key: str) -> list[Message]:
    """A response given as a string (one assistant turn) or as messages that answer."""
    value = _field(obj, key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(obj, key)}]
    return _answering(value, key)


@dataclass
class SFTRecord:
    messages: list[Message]
    """The whole conversation; assistant turns are the targets."""


@dataclass
class PreferenceRecord:
    prompt: list[Message]
    """The shared context."""
    chosen: list[Message]
    """The preferred continuation of `prompt`."""
    rejected: list[Message]
    """The dispreferred continuation of `prompt`."""


@dataclass
class PromptRecord:
    prompt: str | list[Message]
    """What the policy is asked to answer."""
    answer: Any
    """Reference answer for a verifiable reward (any JSON), or None."""
    meta: dict
    """Every other key of the line, passed through to reward functions and logs."""


def parse_sft(obj: dict) -> SFTRecord:
    """`{"prompt": str, "response": str}` or `{"messages": [...]}` (with an assistant answer)."""
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise RecordError("has both 'messages' and 'prompt'/'response'; use one form")
        return SFTRecord(_answering(obj["messages"], "messages"))
    if "prompt" not in obj and "response" not in obj:
        raise RecordError(f"missing key 'messages' or 'prompt'+'response' (keys present: {sorted(obj)})")
    return SFTRecord(pair_to_messages(_text(obj, "prompt"), _text(obj, "response")))


def _prompt_messages(obj: dict) -> list[Message]:
    value = _field(obj, "prompt")
    if isinstance(value, str):
        return [{"role": "user", "content": _text(obj, "prompt")}]
    messages = _messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise RecordError("'prompt' messages must not end with an assistant message (that is the response)")
    return messages


def parse_preference(obj: dict) -> PreferenceRecord:
    """`{"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}`."""
    return PreferenceRecord(_prompt_messages(obj), _completion(obj, "chosen"), _completion(obj, "rejected"))


def parse_prompt(obj: dict) -> PromptRecord:
    """`{"prompt": str|messages, "answer"?: any JSON, ...}`; other keys become `meta`."""
    messages = _prompt_messages(obj)
    prompt = obj["prompt"] if isinstance(obj["prompt"], str) else messages
    answer = obj["answer"] if "answer" in obj else None
    return PromptRecord(prompt, answer, {k: v for k, v in obj.items() if k not in ("prompt", "answer")})
