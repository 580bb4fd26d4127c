"""A model's own Jinja chat template, with loss masks that are verified sample by sample.

Layer: data/ (imports stdlib, megarlhf.config and data.chat / jsonl / tokenizer; transformers
on first render).

Rendering is transformers' own: `transformers.utils.chat_template_utils.render_jinja_template`,
the function `apply_chat_template` calls, with the tokenizer's special tokens as variables
(bos_token, eos_token, ...). Its Jinja environment is the one models are written for
(`raise_exception`, `tojson`, `strftime_now`, loop controls, `{% generation %}`), so a
template renders here exactly as in transformers. The text is tokenized as
`apply_chat_template` does it: special pieces in the text are special tokens, nothing added.

Loss mask of the trained assistant turns (data.train_on: all_assistant | last_assistant):
  - a template with `{% generation %}` blocks: the blocks' characters, as transformers'
    `return_assistant_tokens_mask` marks them;
  - otherwise growing prefixes: turn i spans from the render of messages[:i] with the
    generation prompt to the render of messages[:i+1], cut after the last end-of-turn /
    EOS id in it (ChatML's newline after <|im_end|> is the template's, not the model's).
Checks run on every sample (any failure is a `TemplateError`, which the datasets report
with file:line, or skip and count under data.on_error=skip):
  1. every prefix render is the start of the full render (the template is prefix-preserving);
  2. the pieces between turn boundaries, tokenized apart, join to exactly the full render's
     ids (no token straddles a boundary; costs one more tokenization of each sample);
  3. each trained turn holds an end-of-turn/EOS id (the model learns to stop);
  4. no double BOS; 5. at least one trained token.
"""

from __future__ import annotations

import re
from pathlib import Path

from megarlhf.config.errors import ConfigError
from megarlhf.data.chat import ChatTemplate, Message, Template, trained_turns
from megarlhf.data.jsonl import RecordError
from megarlhf.data.tokenizer import Tokenizer, load_tokenizer

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(RecordError):
    """One sample that the template cannot render, or whose mask fails a check."""


def _shown(tokenizer: Tokenizer, ids: list[int], k: int) -> str:
    return repr(tokenizer.id_to_piece(ids[k])) if k < len(ids) else "(end)"


def first_difference(tokenizer: Tokenizer, a: list[int], b: list[int], a_name: str, b_name: str) -> str:
    """'at token k: <a_name> has 'X', <b_name> has 'Y' (after '...')': where two id lists part."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    before = "".join(tokenizer.id_to_piece(t) for t in a[max(0, k - 4) : k])
    return f"at token {k}: {a_name} has {_shown(tokenizer, a, k)}, {b_name} has {_shown(tokenizer, b, k)} (after {before!r})"


class JinjaChatTemplate:
    """A Jinja chat template (the `Template` protocol) over a tokenizer's special tokens."""

    def __init__(self, source: str, origin: str, train_on: str = "all_assistant", verify: bool = True):
        self.source = source
        self.origin = origin
        """Where the template came from (named in every error)."""
        self.train_on = train_on
        self.verify = verify
        """Run checks 2-4 (False only to measure what they cost: tools/bench_template_checks.py)."""
        self.generation = bool(_GENERATION_BLOCK.search(source))
        """Masks from the template's {% generation %} blocks (else from growing prefixes)."""

    def check(self, tokenizer: Tokenizer) -> None:
        from jinja2 import TemplateSyntaxError
        from transformers.utils.chat_template_utils import _compile_jinja_template  # what rendering uses

        try:
            _compile_jinja_template(self.source)
        except TemplateSyntaxError as e:
            raise ConfigError(f"chat template {self.origin}: line {e.lineno}: {e.message}") from None

    def _render(self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool, spans: bool = False):
        """(text, generation-block character spans or None)."""
        from jinja2 import TemplateError as JinjaError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                [messages], chat_template=self.source, return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens,
            )  # fmt: skip
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"chat template {self.origin} failed on this sample: {type(e).__name__}: {e}") from None
        return texts[0], (indices[0] if spans else None)

    def _check_bos(self, tokenizer: Tokenizer, ids: list[int]) -> None:
        bos = tokenizer.bos_id
        if self.verify and bos is not None and ids[:2] == [bos, bos]:
            raise TemplateError(
                f"the render starts with two BOS tokens {tokenizer.id_to_piece(bos)!r}: the template writes "
                f"bos_token and the text starts with it again; remove one (chat template {self.origin})"
            )

    def _turn_spans(self, tokenizer: Tokenizer, messages: list[Message], full: str, gen_spans, turns: list[int]):
        """{assistant message index: (start, end) characters of its trained text in `full`}."""
        if self.generation:
            assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if len(gen_spans) != len(assistants):
                raise TemplateError(
                    f"chat template {self.origin}: its {{% generation %}} blocks mark {len(gen_spans)} spans "
                    f"for {len(assistants)} assistant messages; expected one block per assistant message"
                )
            return {i: tuple(s) for i, s in zip(assistants, gen_spans) if i in turns}
        spans = {}
        for i in turns:
            before, _ = self._render(tokenizer, messages[:i], add_generation_prompt=True)
            upto, _ = self._render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            for text, what in ((before, f"messages[:{i}] with the generation prompt"), (upto, f"messages[:{i + 1}]")):
                if not full.startswith(text):
                    diff = first_difference(
                        tokenizer, tokenizer.encode_rendered(text), tokenizer.encode_rendered(full),
                        f"the render of {what}", "the render of the whole conversation",
                    )  # fmt: skip
                    raise TemplateError(
                        f"chat template {self.origin} is not prefix-preserving, so the loss mask of assistant "
                        f"turn messages[{i}] cannot be derived from it: {diff}. Give the template "
                        "{% generation %} blocks around the assistant text (data.chat_template=PATH)"
                    )
            if len(before) > len(upto):
                raise TemplateError(
                    f"chat template {self.origin}: the generation prompt before messages[{i}] is longer than "
                    f"the turn it opens ({before[len(upto):]!r} is not in the rendered assistant turn)"
                )
            spans[i] = (len(before), len(upto))
        return spans

    def render(
        self, tokenizer: Tokenizer, messages: list[Message], context_turns: int = 0
    ) -> tuple[list[int], list[int]]:
        turns = trained_turns(messages, context_turns, self.train_on)
        if not turns:
            after = f" after the first {context_turns} (the prompt)" if context_turns else ""
            raise TemplateError(f"no assistant message{after}: nothing to train on")
        full, gen_spans = self._render(tokenizer, messages, add_generation_prompt=False, spans=self.generation)
        spans = self._turn_spans(tokenizer, messages, full, gen_spans, turns)
        cuts = sorted({0, len(full), *(c for s in spans.values() for c in s)})
        trained = {s: i for i, s in spans.items()}
        stops = set(tokenizer.eos_ids)
        ids: list[int] = []
        mask: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer.encode_rendered(full[a:b])
            ids += piece
            turn = trained.get((a, b))
            if turn is None:
                mask += [0] * len(piece)
                continue
            last_stop = max((k for k, t in enumerate(piece) if t in stops), default=None)
            if last_stop is None:
                if self.verify:
                    names = ", ".join(repr(tokenizer.id_to_piece(t)) for t in tokenizer.eos_ids)
                    raise TemplateError(
                        f"assistant turn messages[{turn}] has no end-of-turn/EOS token ({names}) inside its loss "
                        f"mask (its trained text is {full[a:b]!r}), so the model would not learn to stop; set "
                        "data.eos_token to the template's end-of-turn piece, or fix the template"
                    )
                mask += [1] * len(piece)
            elif self.generation:
                mask += [1] * len(piece)  # the blocks say exactly what is trained
            else:  # what follows the end of turn (ChatML's newline) is the template's, not the model's
                mask += [1] * (last_stop + 1) + [0] * (len(piece) - last_stop - 1)
        if self.verify:
            whole = tokenizer.encode_rendered(full)
            if whole != ids:
                raise TemplateError(
                    "the tokens of the pieces between assistant turns do not join to the tokens of the whole "
                    "conversation (a token straddles a turn boundary, so no mask is exact): "
                    + first_difference(tokenizer, ids, whole, "the joined pieces", "the whole render")
                )
            self._check_bos(tokenizer, ids)
        if not any(mask):
            raise TemplateError("no token is trained (the assistant turns render to nothing)")
        return ids, mask

    def render_prompt(self, tokenizer: Tokenizer, prompt: str | list[Message]) -> list[int]:
        messages: list[Message] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("a prompt's messages must not end with an assistant message")
        text, _ = self._render(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer.encode_rendered(text)
        self._check_bos(tokenizer, ids)
        return ids


def load_chat_template(data, tokenizer: Tokenizer, verify: bool = True) -> Template:
    """The template data.chat_template names for `tokenizer` (`data` is a DataConfig):
    'builtin' -> megarlhf's markers; a path -> that Jinja file; '' -> the tokenizer's own
    template, or the markers for a tokenizer that comes without config files (sentencepiece,
    a bare tokenizer.json). An HF tokenizer folder without a template is a ConfigError."""
    choice = data.chat_template
    if choice == "builtin":
        template: Template = ChatTemplate(train_on=data.train_on)
    elif choice:
        path = Path(choice)
        if not path.is_file():
            raise ConfigError(
                f"data.chat_template = {choice!r}: no such file; expected a Jinja template file, 'builtin' "
                "(megarlhf's role markers) or '' (the tokenizer's own template)"
            )
        template = JinjaChatTemplate(path.read_text(encoding="utf-8"), str(path), data.train_on, verify)
    elif tokenizer.chat_template:
        template = JinjaChatTemplate(tokenizer.chat_template, tokenizer.template_origin, data.train_on, verify)
    elif getattr(tokenizer, "has_config", False):
        raise ConfigError(
            f"{data.tokenizer}: the tokenizer has no chat template (tokenizer_config.json has no chat_template "
            "and there is no chat_template.jinja); set data.chat_template to a Jinja file, or "
            "data.chat_template=builtin for megarlhf's role markers"
        )
    else:
        template = ChatTemplate(train_on=data.train_on)
    template.check(tokenizer)
    return template


def tokenizer_and_template(data, verify: bool = True) -> tuple[Tokenizer, Template]:
    """The tokenizer of data.tokenizer with the data.*_token overrides, and its template."""
    tokenizer = load_tokenizer(
        data.tokenizer, bos=data.bos_token or None, eos=data.eos_token or None, pad=data.pad_token or None
    )
    return tokenizer, load_chat_template(data, tokenizer, verify)
