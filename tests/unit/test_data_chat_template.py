"""The model's own chat template: special tokens from the HF files, masks against oracles,
load-time checks failing with the sample and the first differing token.

Oracles: transformers' AutoTokenizer on the same folder (special ids, the rendered ids,
`return_assistant_tokens_mask` for the {% generation %} template), and for the templates
without generation blocks a mask written by hand, segment by segment, per template.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megarlhf.config import ConfigError, DataError
from megarlhf.data import SFTDataset, PreferenceDataset, PromptDataset, collate_sft, load_tokenizer
from megarlhf.data.template import JinjaChatTemplate, TemplateError, load_chat_template, tokenizer_and_template
from tests.hf_fixtures import STYLES, hf_tokenizer, transformers_tokenizer

SINGLE = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}]
MULTI = SINGLE + [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Good bye"}]
SYSTEM = [{"role": "system", "content": "Sort numbers."}] + SINGLE


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    return {style: hf_tokenizer(root / style, style) for style in STYLES}


def data_cfg(tokenizer, chat_template="", train_on="all_assistant", **tokens):
    return SimpleNamespace(tokenizer=str(tokenizer), chat_template=chat_template, train_on=train_on,
                           bos_token=tokens.get("bos", ""), eos_token=tokens.get("eos", ""),
                           pad_token=tokens.get("pad", ""))  # fmt: skip


def expected(style: str, messages: list[dict]) -> list[tuple[str, int]]:
    """The hand-written oracle: (text, trained) segments of each template."""
    segs: list[tuple[str, int]] = []
    if style == "chatml":
        if messages[0]["role"] != "system":
            segs.append(("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", 0))
        for m in messages:
            if m["role"] == "assistant":
                segs += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>", 1), ("\n", 0)]
            else:
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
    elif style == "llama3":
        segs.append(("<|begin_of_text|>", 0))
        for m in messages:
            segs.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0))
            segs.append((m["content"] + "<|eot_id|>", int(m["role"] == "assistant")))
    elif style == "mistral":
        segs.append(("<s>", 0))
        for m in messages:
            if m["role"] == "user":
                segs.append((f"[INST] {m['content']} [/INST]", 0))
            else:
                segs.append((f" {m['content']}</s>", 1))
    return segs


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral", "generation"])
def test_special_tokens_come_from_the_files(folders, style):
    ours, oracle = load_tokenizer(folders[style]), transformers_tokenizer(folders[style])
    assert ours.bos_id == oracle.bos_token_id  # None for ChatML (Qwen-style: no BOS)
    assert ours.eos_id == oracle.eos_token_id
    assert ours.pad_id == (oracle.pad_token_id if oracle.pad_token_id is not None else oracle.eos_token_id)
    gen = json.loads((folders[style] / "generation_config.json").read_text())["eos_token_id"]
    assert set(ours.eos_ids) == {oracle.eos_token_id, *(gen if isinstance(gen, list) else [gen])}


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_prefix_masks_equal_hand_written_masks(folders, style, messages):
    tok, template = tokenizer_and_template(data_cfg(folders[style]))
    assert isinstance(template, JinjaChatTemplate) and not template.generation
    ids, mask = template.render(tok, messages)
    oracle = transformers_tokenizer(folders[style])
    assert ids == oracle.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    want_ids, want_mask = [], []
    for text, trained in expected(style, messages):
        seg = oracle(text, add_special_tokens=False)["input_ids"]
        want_ids += seg
        want_mask += [trained] * len(seg)
    assert ids == want_ids
    assert mask == want_mask


@pytest.mark.parametrize("messages", [SINGLE, MULTI, SYSTEM], ids=["single", "multi", "system"])
def test_generation_block_mask_equals_transformers(folders, messages):
    tok, template = tokenizer_and_template(data_cfg(folders["generation"]))
    assert template.generation
    ids, mask = template.render(tok, messages)
    oracle = transformers_tokenizer(folders["generation"]).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == oracle["input_ids"]
    assert mask == oracle["assistant_masks"]


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral", "generation"])
def test_rl_prompt_equals_apply_chat_template_with_generation_prompt(folders, style):
    tok, template = tokenizer_and_template(data_cfg(folders[style]))
    oracle = transformers_tokenizer(folders[style])
    prompt = MULTI[:3]
    want = oracle.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert template.render_prompt(tok, prompt) == want["input_ids"]
    assert template.render_prompt(tok, "What is two plus two?") == oracle.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}], tokenize=True, add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]  # fmt: skip


def test_train_on_last_assistant_and_preference_context(folders):
    tok, last = tokenizer_and_template(data_cfg(folders["chatml"], train_on="last_assistant"))
    _, every = tokenizer_and_template(data_cfg(folders["chatml"]))
    ids, mask_last = last.render(tok, MULTI)
    _, mask_all = every.render(tok, MULTI)
    trained = [tok.id_to_piece(i) for i, m in zip(ids, mask_last) if m]
    assert "".join(trained).replace("Ġ", " ") == "Good bye<|im_end|>"
    assert sum(mask_all) > sum(mask_last)
    # A preference pair's prompt may hold assistant turns: context, never trained.
    ids_ctx, mask_ctx = every.render(tok, MULTI, context_turns=3)
    assert (ids_ctx, mask_ctx) == (ids, mask_last)


def test_non_prefix_preserving_template_fails_with_the_first_differing_tokens(folders):
    tok, template = tokenizer_and_template(data_cfg(folders["nonprefix"]))
    template.render(tok, SINGLE)  # one turn: the last turn is the whole conversation, nothing differs
    with pytest.raises(TemplateError, match=r"not prefix-preserving.*messages\[1\].*at token \d+: the render of "
                       r"messages\[:2\] has '<think>', the render of the whole conversation has 'T'"):  # fmt: skip
        template.render(tok, MULTI)


def test_sample_without_assistant_turn_fails(folders):
    tok, template = tokenizer_and_template(data_cfg(folders["chatml"]))
    with pytest.raises(TemplateError, match="no assistant message: nothing to train on"):
        template.render(tok, SINGLE[:1])
    with pytest.raises(TemplateError, match=r"no assistant message after the first 2 \(the prompt\)"):
        template.render(tok, SINGLE, context_turns=2)


def test_eos_outside_the_mask_and_double_bos_fail(folders, tmp_path):
    tok, _ = tokenizer_and_template(data_cfg(folders["chatml"]))
    no_stop = JinjaChatTemplate(STYLES["chatml"][4].replace("'<|im_end|>' + '\\n'", "'\\n'"), "no-stop.jinja")
    with pytest.raises(TemplateError, match=r"messages\[1\] has no end-of-turn/EOS token \('<\|im_end\|>', "
                       r"'<\|endoftext\|>'\) inside its loss mask"):  # fmt: skip
        no_stop.render(tok, SINGLE)
    llama, _ = tokenizer_and_template(data_cfg(folders["llama3"]))
    twice = JinjaChatTemplate("{{ bos_token }}" + STYLES["llama3"][4], "twice.jinja")
    with pytest.raises(TemplateError, match=r"starts with two BOS tokens '<\|begin_of_text\|>'"):
        twice.render(llama, SINGLE)
    with pytest.raises(TemplateError, match="two BOS"):
        twice.render_prompt(llama, "hi")


def test_dataset_names_the_line_and_skips_under_on_error_skip(folders, tmp_path):
    tok, template = tokenizer_and_template(data_cfg(folders["nonprefix"]))
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (SINGLE, MULTI, SINGLE)) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: chat template .* is not prefix-preserving"):
        SFTDataset(path, tok, template, max_length=128)
    data = SFTDataset(path, tok, template, max_length=128, on_error="skip")
    assert (len(data), data.num_skipped, data.lines) == (2, 1, [1, 3])


def test_pad_equal_to_eos_keeps_the_eos_in_the_loss(tmp_path):
    """TRL #1623: padding must not be found by comparing with pad_id when PAD == EOS."""
    folder = hf_tokenizer(tmp_path / "tok", "chatml", pad=None)
    tok, template = tokenizer_and_template(data_cfg(folder))
    assert tok.pad_id == tok.eos_id
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "What is two plus two?", "response": "four"}) + "\n")
    item = SFTDataset(path, tok, template, max_length=64)[0]
    batch = collate_sft([item], seq_length=64, pad_id=tok.pad_id)
    n = len(item["input_ids"])
    eos_positions = (batch["tokens"][0, :n] == tok.eos_id).nonzero().flatten().tolist()
    assert batch["loss_mask"][0, eos_positions[-1]] == 1  # the answer's <|im_end|> is a target
    assert batch["loss_mask"][0, n:].sum() == 0 and (batch["tokens"][0, n:] == tok.eos_id).all()


def test_preference_and_prompt_datasets_use_the_template(folders, tmp_path):
    tok, template = tokenizer_and_template(data_cfg(folders["llama3"]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": MULTI[:3], "chosen": "Good bye", "rejected": [MULTI[3] | {"content": "No"}]}))
    item = PreferenceDataset(pairs, tok, template, max_length=128)[0]
    for side, answer in (("chosen", "Good bye"), ("rejected", "No")):
        ids, mask = item[f"{side}_ids"].tolist(), item[f"{side}_mask"].tolist()
        assert ids == transformers_tokenizer(folders["llama3"]).apply_chat_template(
            MULTI[:3] + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer  # <|eot_id|> trained, decoded away
        assert ids[[k for k, m in enumerate(mask) if m][-1]] == tok.token_to_id("<|eot_id|>")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is two plus two?", "answer": "4"}))
    assert PromptDataset(prompts, tok, template, max_length=64)[0]["prompt_ids"].tolist() == template.render_prompt(
        tok, "What is two plus two?")  # fmt: skip


def test_template_sources_and_config_errors(folders, tmp_path):
    # tokenizer_config.json's chat_template (the older place) is read as well as chat_template.jinja.
    folder = hf_tokenizer(tmp_path / "old", "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (folder / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    tok, template = tokenizer_and_template(data_cfg(folder))
    assert "tokenizer_config.json" in template.origin
    assert template.render(tok, SINGLE) == tokenizer_and_template(data_cfg(folders["chatml"]))[1].render(tok, SINGLE)
    # An override file; 'builtin' (needs the marker pieces: a ConfigError names them here).
    override = tmp_path / "mine.jinja"
    override.write_text(STYLES["generation"][4])
    assert tokenizer_and_template(data_cfg(folder, chat_template=str(override)))[1].generation
    with pytest.raises(ConfigError, match=r"the system marker '<\|system\|>' is not a piece"):
        tokenizer_and_template(data_cfg(folder, chat_template="builtin"))
    with pytest.raises(ConfigError, match="data.chat_template = 'nope.jinja': no such file"):
        tokenizer_and_template(data_cfg(folder, chat_template="nope.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match=rf"chat template {bad}: line 1"):
        tokenizer_and_template(data_cfg(folder, chat_template=str(bad)))
    # An HF folder without any template and no override.
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": None}))
    with pytest.raises(ConfigError, match="has no chat template.*set data.chat_template"):
        tokenizer_and_template(data_cfg(folder))


def test_special_token_overrides_and_their_errors(folders, tmp_path):
    tok = load_tokenizer(folders["chatml"], eos="<|endoftext|>", pad="<|im_start|>")
    assert (tok.eos_id, tok.pad_id) == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_start|>"))
    assert load_tokenizer(folders["llama3"], bos="none").bos_id is None
    for field, kwargs in (("data.bos_token", {"bos": "<nope>"}), ("data.eos_token", {"eos": "<nope>"}),
                          ("data.pad_token", {"pad": "<nope>"})):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"no [A-Z]+ piece '<nope>'; set {field}"):
            load_tokenizer(folders["mistral"], **kwargs)
    folder = hf_tokenizer(tmp_path / "noeos", "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    assert load_tokenizer(folder).eos_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    (folder / "generation_config.json").unlink()
    with pytest.raises(ConfigError, match="no EOS token.*set data.eos_token"):
        load_tokenizer(folder)
    assert load_tokenizer(folder, eos="<|im_end|>").eos_ids == (tok.token_to_id("<|im_end|>"),)


def test_hf_folder_with_only_a_sentencepiece_model_asks_for_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer.json; write one with: python -c"):
        load_tokenizer(tmp_path)
