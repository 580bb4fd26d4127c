"""Layer: data/ — tokenizers, chat templates, row readers and datasets, collation, sampler, synthetic task.

Imports only torch, numpy, stdlib, sentencepiece, tokenizers and megarlhf.config (tqdm
only when a progress bar is asked for, pyarrow / `datasets` only when a source needs
them, transformers' Jinja rendering when a model's own chat template is used); never
Megatron, never torch.distributed.
"""

from megarlhf.data.chat import ChatTemplate, Message, Template, pair_to_messages
from megarlhf.data.collate import collate_preference, collate_prompts, collate_sft, pad_right
from megarlhf.data.datasets import PreferenceDataset, PromptDataset, SFTDataset
from megarlhf.data.jsonl import (
    PreferenceRecord, PromptRecord, RecordError, SFTRecord, parse_preference, parse_prompt, parse_sft,
)  # fmt: skip
from megarlhf.data.readers import Location, Records, open_rows, read_jsonl
from megarlhf.data.sampler import ShardedSampler
from megarlhf.data.synthetic import (
    make_preferences, make_prompts, make_sft, sort_reward, sorted_answer, write_synthetic,
)  # fmt: skip
from megarlhf.data.template import JinjaChatTemplate, TemplateError, load_chat_template, tokenizer_and_template
from megarlhf.data.tokenizer import (
    CHAT_MARKERS, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece,
)  # fmt: skip

__all__ = [
    "CHAT_MARKERS", "ChatTemplate", "HFTokenizer", "JinjaChatTemplate", "Location", "Message", "PreferenceDataset",
    "PreferenceRecord", "PromptDataset", "PromptRecord", "RecordError", "Records", "SFTDataset", "SFTRecord",
    "SentencePieceTokenizer", "Template", "TemplateError", "load_chat_template", "tokenizer_and_template",
    "ShardedSampler", "Tokenizer", "collate_preference", "collate_prompts", "collate_sft", "load_tokenizer",
    "make_preferences", "make_prompts", "make_sft", "open_rows", "pad_right", "pair_to_messages", "parse_preference",
    "parse_prompt", "parse_sft", "read_jsonl", "sort_reward", "sorted_answer", "train_sentencepiece",
    "write_synthetic",
]  # fmt: skip
