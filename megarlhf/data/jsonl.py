"""Record schemas: one parser per kind of record, each naming what is wrong with a row.

Layer: data/ (imports stdlib, megarlhf.config and data.chat only).

A parser takes one row (a dict: a JSON object, or a Parquet/Arrow row after the column
mapping) and returns a record, or raises `RecordError("what is wrong")`, to which the row
reader (`data.readers.Records`) prepends the location (`file:line` or `file row N`).
Under `on_error="skip"` a bad row is dropped and counted by its `kind`; nothing is
skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megarlhf.data.chat import ROLES, Message, pair_to_messages

SFT_COLUMNS = ("prompt", "response", "messages")
"""Record keys parse_sft reads (each mappable with data.<key>_key)."""
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
"""Record keys parse_preference reads."""
PROMPT_COLUMNS = ("prompt", "answer")
"""Record keys parse_prompt reads."""
OPTIONAL_COLUMNS = ("answer",)
"""Keys a parser accepts as absent: when mapped to a column, that column is required."""


class RecordError(ValueError):
    """One record is malformed; the message says what is wrong (no file or line yet).

    `column`: the record key at fault, where one is (the reader names its mapped column);
    `kind`: how a skipped record is counted under on_error="skip".
    """

    def __init__(self, message: str, column: str | None = None, kind: str = "bad rows"):
        super().__init__(message)
        self.column, self.kind = column, kind


def json_type(value: Any) -> str:
    """The JSON name of a value's type ('null', 'string', ...), else its Python type name."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(obj: dict, key: str) -> Any:
    if key not in obj:
        raise RecordError(f"missing key {key!r} (keys present: {sorted(obj)})", column=key)
    return obj[key]


def _text(obj: dict, key: str) -> str:
    """A required, non-empty string field."""
    value = _field(obj, key)
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {json_type(value)}", column=key)
    if not value:
        raise RecordError(f"{key!r} is an empty string", column=key)
    return value


def _messages(value: Any, key: str) -> list[Message]:
    """A non-empty list of {"role", "content"} objects (other keys in a message are ignored)."""
    if not isinstance(value, list):
        raise RecordError(f"{key!r} must be an array of messages, got {json_type(value)}", column=key)
    if not value:
        raise RecordError(f"{key!r} is an empty array", column=key)
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(
                f"{where} must be an object with 'role' and 'content', got {json_type(m)}", column=key
            )
        for k in ("role", "content"):
            if k not in m:
                raise RecordError(f"{where}: missing key {k!r}", column=key)
        if m["role"] not in ROLES:
            raise RecordError(f"{where}.role must be one of {ROLES}, got {m['role']!r}", column=key)
        if not isinstance(m["content"], str):
            raise RecordError(f"{where}.content must be a string, got {json_type(m['content'])}", column=key)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answering(value: Any, key: str) -> list[Message]:
    """Messages that contain an answer to learn from."""
    messages = _messages(value, key)
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise RecordError(
            f"{key!r} has no assistant message with non-empty content (nothing to learn from)", column=key
        )
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
    """`{"prompt": str, "response": str}` or `{"messages": [...]}` (with an assistant answer).

    A null counts as absent when picking the form: a Parquet/Arrow file holding both forms
    has nulls in the other form's columns. A `prompt` next to `messages` (no `response`) is
    accepted when it is the text of the first user message, as in HuggingFaceH4/ultrachat_200k."""
    present = {k for k in ("messages", "prompt", "response") if obj.get(k) is not None}
    if "messages" in present or ("messages" in obj and not present):
        messages = _answering(obj["messages"], "messages")
        if "response" in present or ("prompt" in present and obj["prompt"] != _first_user(messages)):
            raise RecordError(
                "has both 'messages' and 'prompt'/'response' (a prompt other than the first user message's "
                "text); use one form"
            )
        return SFTRecord(messages)
    if "prompt" not in obj and "response" not in obj:
        raise RecordError(f"missing key 'messages' or 'prompt'+'response' (keys present: {sorted(obj)})")
    return SFTRecord(pair_to_messages(_text(obj, "prompt"), _text(obj, "response")))


def _first_user(messages: list[Message]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user"), None)


def _prompt_messages(obj: dict) -> list[Message]:
    value = _field(obj, "prompt")
    if isinstance(value, str):
        return [{"role": "user", "content": _text(obj, "prompt")}]
    messages = _messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise RecordError(
            "'prompt' messages must not end with an assistant message (that is the response)", column="prompt"
        )
    return messages


def parse_preference(obj: dict) -> PreferenceRecord:
    """`{"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}`.

    Hub preference sets often repeat the prompt inside the completions: message-list
    completions that start with the prompt's messages have them removed (else the prompt
    would be rendered twice), and without a prompt (absent or null) the prompt is the
    messages chosen and rejected share up to their last non-assistant one (TRL's
    "implicit prompt"). A pair whose chosen equals its rejected expresses no preference
    and is rejected (kind "chosen equals rejected", counted apart under on_error=skip)."""
    chosen, rejected = _completion(obj, "chosen"), _completion(obj, "rejected")
    if obj.get("prompt") is None and isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list):
        prompt = _shared_prompt(chosen, rejected)
    else:
        prompt = _prompt_messages(obj)
    chosen, rejected = (_after(prompt, side, key) for side, key in ((chosen, "chosen"), (rejected, "rejected")))
    if chosen == rejected:
        raise RecordError(
            "'chosen' equals 'rejected': the pair expresses no preference (its loss gradient is 0 for DPO "
            "and only pushes both rewards together for an RM); fix or remove it, or set data.on_error=skip "
            "to drop such pairs (they are counted)",
            column="chosen", kind="chosen equals rejected",
        )  # fmt: skip
    return PreferenceRecord(prompt, chosen, rejected)


def _shared_prompt(chosen: list[Message], rejected: list[Message]) -> list[Message]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":
        n -= 1  # a prompt ends where the assistant is to answer
    if n == 0:
        raise RecordError(
            "no 'prompt', and 'chosen' and 'rejected' share no leading messages to take it from; add a prompt "
            "column (or name it with data.prompt_key)", column="prompt",
        )  # fmt: skip
    return chosen[:n]


def _after(prompt: list[Message], completion: list[Message], key: str) -> list[Message]:
    """`completion` without a leading copy of `prompt`; what remains must answer."""
    if len(completion) > len(prompt) and completion[: len(prompt)] == prompt:
        return _answering(completion[len(prompt) :], key)
    return completion


def parse_prompt(obj: dict) -> PromptRecord:
    """`{"prompt": str|messages, "answer"?: any JSON, ...}`; other keys become `meta`."""
    messages = _prompt_messages(obj)
    prompt = obj["prompt"] if isinstance(obj["prompt"], str) else messages
    answer = obj["answer"] if "answer" in obj else None
    return PromptRecord(prompt, answer, {k: v for k, v in obj.items() if k not in ("prompt", "answer")})
