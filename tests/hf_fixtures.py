"""Tiny Hugging Face tokenizer folders built by the tests (no downloads), shared by test modules.

`hf_tokenizer(folder, style)` trains a byte-level BPE with the `tokenizers` library, adds the
style's special tokens, wraps it in transformers' PreTrainedTokenizerFast and writes it with
save_pretrained (tokenizer.json, tokenizer_config.json, chat template), plus a
generation_config.json. Styles copy the shape of real models' templates:

  chatml      Qwen2.5 / SmolLM2: <|im_start|>role ... <|im_end|>, a default system prompt,
              no BOS, EOS <|im_end|>, PAD <|endoftext|>, generation EOS [<|im_end|>, <|endoftext|>]
  llama3      <|begin_of_text|> BOS, <|start_header_id|>role<|end_header_id|> ... <|eot_id|>;
              EOS <|end_of_text|>, generation EOS [<|end_of_text|>, <|eot_id|>] (the turn ends
              with an id only generation_config.json names)
  mistral     <s>[INST] ... [/INST] answer</s>: no end-of-turn token besides EOS
  generation  ChatML whose assistant text sits in {% generation %} blocks
  nonprefix   ChatML that writes a <think> block only into the last assistant turn (as
              Qwen3's template drops earlier reasoning): not prefix-preserving
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('only user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NONPREFIX = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and loop.last %}{{- '<think>\\nok\\n</think>\\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STYLES = {
    # style: (special tokens, bos, eos, pad, template, generation_config eos pieces)
    "chatml": (_CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", CHATML, ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3, ["<|end_of_text|>", "<|eot_id|>"]),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, MISTRAL, ["</s>"]),
    "generation": (_CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", GENERATION, ["<|im_end|>"]),
    "nonprefix": (_CHATML_SPECIALS + ["<think>", "</think>"], None, "<|im_end|>", "<|endoftext|>", NONPREFIX,
                  ["<|im_end|>"]),
}  # fmt: skip

CORPUS = [
    "You are a helpful assistant.",
    "What is two plus two? Two plus two is four.",
    "Sort these numbers: 3 1 2. The sorted numbers are 1 2 3.",
    "Hello! How can I help you today? Tell me a joke. Why did the chicken cross the road?",
    "system user assistant the a an is are of to and in on for with what where when why how ok",
    "0 1 2 3 4 5 6 7 8 9 Yes No Thanks Good bye",
]


def hf_tokenizer(folder: str | Path, style: str = "chatml", *, vocab_size: int = 400,
                 pad: str | None = "default", generation_eos: list[str] | None = None) -> Path:  # fmt: skip
    """Write a tokenizer folder of `style` (see the module docstring) and return it.
    `pad=None` leaves PAD unset (it is then EOS); `generation_eos` replaces the style's
    generation_config.json eos_token_id pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    specials, bos, eos, style_pad, template, gen_eos = STYLES[style]
    pad = style_pad if pad == "default" else pad
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>" if "<unk>" in specials else None)  # fmt: skip
    fast.chat_template = template
    folder = Path(folder)
    fast.save_pretrained(folder)
    ids = [tok.token_to_id(p) for p in (generation_eos or gen_eos)]
    GenerationConfig(eos_token_id=ids if len(ids) > 1 else ids[0], bos_token_id=tok.token_to_id(bos) if bos else None,
                     pad_token_id=tok.token_to_id(pad) if pad else None).save_pretrained(folder)  # fmt: skip
    return folder


def write_generation_eos(folder: str | Path, ids: list[int]) -> None:
    """Rewrite generation_config.json's eos_token_id."""
    path = Path(folder) / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg["eos_token_id"] = ids
    path.write_text(json.dumps(cfg))


def transformers_tokenizer(folder: str | Path):
    """The oracle: transformers' own tokenizer from the same folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tiny_llama(folder: str | Path, style: str = "chatml", seed: int = 0, max_positions: int = 128,
               sharpen: float = 1.0) -> Path:  # fmt: skip
    """A random Llama (2 layers, hidden 64, GQA 4/2, `max_positions` positions) saved by
    transformers as an HF model folder, with a tokenizer of `style` (its files next to the
    weights, as on the Hub). `sharpen` scales the output layer: greedy argmaxes then lie far
    from ties, so two implementations' greedy tokens can be compared."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = hf_tokenizer(folder, style)
    tok = transformers_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    generation = (folder / "generation_config.json").read_text()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(generation)  # the tokenizer style's EOS ids
    return folder
