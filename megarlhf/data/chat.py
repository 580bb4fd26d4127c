"""Chat templates: messages -> token ids plus the mask of tokens the policy is trained on.

Layer: data/ (imports stdlib, megarlhf.config and data.tokenizer only).

One protocol (`Template`), two implementations: `ChatTemplate` here, megarlhf's built-in
role markers for the synthetic task and tiny sentencepiece tokenizers; and
`data.template.JinjaChatTemplate`, a model's own Jinja template with verified masks.
`data.template.load_chat_template` picks one from data.chat_template.

Layout of a rendered conversation (markers are single pieces, no text around them):

    BOS  <|user|> prompt...  <|assistant|> response... EOS  <|user|> ...
    0    0        0 ... 0    0             1 ...    1   1   0

The mask is 1 exactly on assistant content and the EOS that closes it: the model learns
to answer and to stop, never to predict the user's words or the role markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

from megarlhf.config.errors import ConfigError
from megarlhf.data.tokenizer import CHAT_MARKERS, Tokenizer

ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    """One chat turn, as in the JSONL `messages` lists."""

    role: Literal["system", "user", "assistant"]
    content: str


def pair_to_messages(prompt: str, response: str) -> list[Message]:
    """A plain `{"prompt", "response"}` pair as a one-exchange conversation."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


TRAIN_ON = ("all_assistant", "last_assistant")


class Template(Protocol):
    """What the datasets and trainers call."""

    def check(self, tokenizer: Tokenizer) -> None:
        """Raise ConfigError if the template cannot work with `tokenizer` (before any data)."""
        ...

    def render(self, tokenizer: Tokenizer, messages: list[Message], context_turns: int = 0) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and its loss mask (same length; 1 = trained on).
        Messages before `context_turns` are context: their assistant turns are not trained
        (a preference pair's shared prompt)."""
        ...

    def render_prompt(self, tokenizer: Tokenizer, prompt: str | list[Message]) -> list[int]:
        """Ids the policy is asked to continue (the generation prompt appended)."""
        ...


def trained_turns(messages: list[Message], context_turns: int, train_on: str) -> list[int]:
    """Indices of the assistant messages whose tokens are trained."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= context_turns]
    return turns[-1:] if train_on == "last_assistant" else turns


@dataclass(frozen=True)
class ChatTemplate:
    """How roles are marked in the token stream (the built-in template)."""

    system: str = CHAT_MARKERS["system"]
    """Piece that opens a system message."""
    user: str = CHAT_MARKERS["user"]
    """Piece that opens a user message."""
    assistant: str = CHAT_MARKERS["assistant"]
    """Piece that opens an assistant message (a prompt for generation ends with it)."""
    add_bos: bool = True
    """Start every sequence with the tokenizer's BOS (if it has one)."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns are trained (data.train_on)."""

    def check(self, tokenizer: Tokenizer) -> None:
        self.marker_ids(tokenizer)

    def marker_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """Role -> marker id; each marker must be one piece of the tokenizer."""
        ids = {}
        for role in ROLES:
            piece = getattr(self, role)
            ids[role] = tokenizer.token_to_id(piece)
            if ids[role] is None:
                raise ConfigError(
                    f"chat template: the {role} marker {piece!r} is not a piece of the tokenizer; "
                    "train the tokenizer with it as a user-defined symbol (tools/train_tokenizer.py "
                    "does) or set the template's markers to pieces the tokenizer has"
                )
        return ids

    def render(
        self, tokenizer: Tokenizer, messages: list[Message], context_turns: int = 0
    ) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and its loss mask (same length; 1 = trained on)."""
        markers = self.marker_ids(tokenizer)
        ids = [tokenizer.bos_id] if self.add_bos and tokenizer.bos_id is not None else []
        mask = [0] * len(ids)
        trained = set(trained_turns(messages, context_turns, self.train_on))
        for i, msg in enumerate(messages):
            role = msg["role"]
            if role not in markers:
                raise ValueError(f"messages[{i}]: role {role!r} is not one of {ROLES}")
            content = tokenizer.encode(msg["content"])
            ids += [markers[role], *content]
            if role == "assistant":
                ids.append(tokenizer.eos_id)
                mask += [0] + [int(i in trained)] * (len(content) + 1)
            else:
                mask += [0] * (len(content) + 1)
        return ids, mask

    def render_prompt(self, tokenizer: Tokenizer, prompt: str | list[Message]) -> list[int]:
        """Ids the policy is asked to continue: the conversation, then the assistant marker.

        A string is one user message. A message list must not end with an assistant turn
        (its EOS would tell the policy the answer is already over).
        """
        messages: list[Message] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("a prompt's messages must not end with an assistant message")
        ids, _ = self.render(tokenizer, messages)
        return ids + [self.marker_ids(tokenizer)["assistant"]]
