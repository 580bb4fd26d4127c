"""Chat template, JSONL validation (file:line errors), tokenized datasets and collation."""

import json

import pytest
import torch

from megarlhf.config import ConfigError, DataError
from megarlhf.data.chat import ChatTemplate
from megarlhf.data.collate import collate_preference, collate_prompts, collate_sft, pad_right
from megarlhf.data.datasets import PreferenceDataset, PromptDataset, SFTDataset
from megarlhf.data.jsonl import parse_preference, parse_prompt, parse_sft
from megarlhf.data.readers import read_jsonl
from megarlhf.data.tokenizer import load_tokenizer, train_sentencepiece

CORPUS = [
    "you are a helpful sorter", "sort: 7 2 9 4", "2 4 7 9", "what is the answer", "the answer is 42",
    "thanks a lot", "hello there", "0 1 2 3 4 5 6 7 8 9",
]  # fmt: skip
TEMPLATE = ChatTemplate()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20) + "\n")
    return load_tokenizer(train_sentencepiece([d / "corpus.txt"], d / "sp", 80, "bpe"))


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- chat template

CONVERSATION = [
    {"role": "system", "content": "you are a helpful sorter"},
    {"role": "user", "content": "sort: 7 2 9 4"},
    {"role": "assistant", "content": "2 4 7 9"},
    {"role": "user", "content": "what is the answer"},
    {"role": "assistant", "content": "the answer is 42"},
]


def test_render_matches_hand_built_layout(tok):
    ids, mask = TEMPLATE.render(tok, CONVERSATION)
    marker = {r: tok.token_to_id(f"<|{r}|>") for r in ("system", "user", "assistant")}
    want_ids, want_mask = [tok.bos_id], [0]
    for m in CONVERSATION:
        content = tok.encode(m["content"])
        is_answer = m["role"] == "assistant"
        want_ids += [marker[m["role"]], *content] + ([tok.eos_id] if is_answer else [])
        want_mask += [0] + [int(is_answer)] * (len(content) + int(is_answer))
    assert (ids, mask) == (want_ids, want_mask)


def test_loss_mask_covers_exactly_assistant_tokens_and_eos(tok):
    ids, mask = TEMPLATE.render(tok, CONVERSATION)
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [r[-1] for r in runs] == [tok.eos_id] * len(answers)  # every answer learns to stop
    assert [tok.decode(r) for r in runs] == answers
    unmasked = [i for i, m in zip(ids, mask) if not m]
    assert tok.eos_id not in unmasked and tok.token_to_id("<|assistant|>") in unmasked


def test_render_prompt_ends_with_assistant_marker(tok):
    prompt_ids = TEMPLATE.render_prompt(tok, "sort: 7 2 9 4")
    full, _ = TEMPLATE.render(tok, CONVERSATION[1:3])
    assert prompt_ids[-1] == tok.token_to_id("<|assistant|>")
    assert full[: len(prompt_ids)] == prompt_ids  # the policy continues exactly where SFT answered
    user, assistant = tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>")
    assert TEMPLATE.render_prompt(tok, CONVERSATION[:2]) == TEMPLATE.render(tok, CONVERSATION[:2])[0] + [assistant]
    no_bos = ChatTemplate(add_bos=False)
    assert no_bos.render_prompt(tok, "hello there") == [user, *tok.encode("hello there"), assistant]


def test_template_marker_missing_from_tokenizer_is_a_config_error(tok):
    with pytest.raises(ConfigError, match=r"the user marker '\[INST\]' is not a piece of the tokenizer"):
        ChatTemplate(user="[INST]").render(tok, CONVERSATION)


# ---------------------------------------------------------------- JSONL errors: file:line: reason

GOOD_SFT = {"prompt": "sort: 7 2 9 4", "response": "2 4 7 9"}


@pytest.mark.parametrize(
    "bad, parse, reason",
    [
        ('{"prompt": "a", "response": ', parse_sft, "invalid JSON: Expecting value at column 28"),
        ("[1, 2]", parse_sft, "expected a JSON object, got array"),
        ({"prompt": "a"}, parse_sft, "missing key 'response'"),
        ({"text": "a"}, parse_sft, "missing key 'messages' or 'prompt'+'response'"),
        ({"prompt": 3, "response": "a"}, parse_sft, "'prompt' must be a string, got number"),
        ({"prompt": "a", "response": ""}, parse_sft, "'response' is an empty string"),
        ({"messages": [{"role": "user", "content": "a"}]}, parse_sft, "'messages' has no assistant message"),
        ({"messages": [{"role": "assistant", "content": ""}]}, parse_sft, "'messages' has no assistant message"),
        ({"messages": [{"role": "bot", "content": "a"}]}, parse_sft, "messages[0].role must be one of"),
        ({"messages": [{"role": "user"}]}, parse_sft, "messages[0]: missing key 'content'"),
        ({"messages": [{"role": "user", "content": 1}]}, parse_sft, "messages[0].content must be a string, got number"),
        ({"messages": "hi"}, parse_sft, "'messages' must be an array of messages, got string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "c"},
         parse_sft, "has both 'messages' and 'prompt'/'response'"),
        ({"messages": [{"role": "assistant", "content": "b"}], "response": "b"}, parse_sft, "has both 'messages'"),
        ({"prompt": "a", "chosen": "b"}, parse_preference, "missing key 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": None}, parse_preference, "'rejected' must be an array of messages"),
        ({"prompt": "a", "chosen": "b", "rejected": ""}, parse_preference, "'rejected' is an empty string"),
        ({"prompt": ""}, parse_prompt, "'prompt' is an empty string"),
        ({"prompt": [{"role": "assistant", "content": "a"}]}, parse_prompt, "'prompt' messages must not end with"),
        ({"answer": 1}, parse_prompt, "missing key 'prompt'"),
        ({"prompt": None}, parse_prompt, "'prompt' must be an array of messages, got null"),
    ],
)  # fmt: skip
def test_each_bad_line_names_file_line_and_reason(tmp_path, bad, parse, reason):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"} if parse is parse_preference else GOOD_SFT
    path = write_lines(tmp_path / "data.jsonl", [good, "", bad, good])  # blank line 2 still counts
    with pytest.raises(DataError) as e:
        read_jsonl(path, parse)
    assert str(e.value).startswith(f"{path}:3: {reason}")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid UTF-8"):
        read_jsonl(path, parse_sft)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'absent.jsonl'}: no such file"):
        read_jsonl(tmp_path / "absent.jsonl", parse_sft)
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        read_jsonl(tmp_path / "absent.jsonl", parse_sft, on_error="ignore")


def test_skip_mode_counts_and_keeps_line_numbers(tmp_path):
    lines = [GOOD_SFT, "not json", {"prompt": "x"}, "", {"prompt": "b", "response": "c"}, "7"]
    records, skipped = read_jsonl(write_lines(tmp_path / "d.jsonl", lines), parse_sft, on_error="skip")
    assert skipped == 3
    assert [n for n, _ in records] == [1, 5]
    assert records[1][1].messages == [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]


def test_prompt_records_keep_answer_and_metadata(tmp_path):
    lines = [{"prompt": "p", "answer": [1, 2], "id": 7, "source": "x"}, {"prompt": [{"role": "user", "content": "q"}]}]
    (_, a), (_, b) = read_jsonl(write_lines(tmp_path / "p.jsonl", lines), parse_prompt)[0]
    assert (a.prompt, a.answer, a.meta) == ("p", [1, 2], {"id": 7, "source": "x"})
    assert (b.prompt, b.answer, b.meta) == ([{"role": "user", "content": "q"}], None, {})


# ---------------------------------------------------------------- datasets: length policy


def sft_length(tok, prompt, response):
    return 1 + 1 + len(tok.encode(prompt)) + 1 + len(tok.encode(response)) + 1  # BOS u.. a.. EOS


def test_sft_items_and_too_long_error(tok, tmp_path):
    short = {"prompt": "hello there", "response": "thanks a lot"}
    long = {"prompt": "sort: 7 2 9 4", "response": "0 1 2 3 4 5 6 7 8 9"}
    path = write_lines(tmp_path / "sft.jsonl", [short, long])
    n_short, n_long = sft_length(tok, **short), sft_length(tok, **long)
    assert n_short < n_long - 1
    ds = SFTDataset(path, tok, TEMPLATE, max_length=n_long)
    assert len(ds) == 2 and ds.num_skipped == 0 and ds.source == str(path) and ds.lines == [1, 2]
    assert ds[0]["input_ids"].dtype == torch.long and ds[0]["loss_mask"].dtype == torch.float
    assert ds[0]["input_ids"].tolist() == TEMPLATE.render(tok, [
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "thanks a lot"}])[0]  # fmt: skip
    with pytest.raises(DataError) as e:
        SFTDataset(path, tok, TEMPLATE, max_length=n_long - 1)
    assert str(e.value).startswith(f"{path}:2: sample has {n_long} tokens, max_length is {n_long - 1}")


def test_sft_right_truncation_and_drop(tok, tmp_path):
    rows = [{"prompt": "hello there", "response": "thanks a lot"}, {"prompt": "sort: 7 2 9 4", "response": "2 4 7 9"}]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    n_short, n_long = sft_length(tok, **rows[0]), sft_length(tok, **rows[1])
    m = n_long - 3  # cuts "9" and the EOS of line 2 (each digit is "▁" + digit), keeps line 1 whole
    assert n_short <= m
    full = SFTDataset(path, tok, TEMPLATE, max_length=n_long)
    cut = SFTDataset(path, tok, TEMPLATE, max_length=m, truncation="right")
    assert cut[0]["input_ids"].tolist() == full[0]["input_ids"].tolist()
    assert cut[1]["input_ids"].tolist() == full[1]["input_ids"][:m].tolist()
    assert cut[1]["loss_mask"].tolist() == full[1]["loss_mask"][:m].tolist()
    assert tok.decode(cut[1]["input_ids"][cut[1]["loss_mask"].bool()].tolist()) == "2 4 7"
    dropped = SFTDataset(path, tok, TEMPLATE, max_length=m, truncation="drop")
    assert (len(dropped), dropped.num_skipped, dropped.lines) == (1, 1, [1])


def test_right_truncation_that_removes_the_whole_response_is_an_error_or_counted(tok, tmp_path):
    rows = [{"prompt": "hello there", "response": "thanks a lot"}, {"prompt": "sort: 7 2 9 4 0 1 2 3", "response": "9"}]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    limit = 2 + len(tok.encode(rows[1]["prompt"]))  # cut right after the prompt of line 2
    assert sft_length(tok, **rows[0]) <= limit
    with pytest.raises(DataError) as e:
        SFTDataset(path, tok, TEMPLATE, max_length=limit, truncation="right")
    assert str(e.value).startswith(f"{path}:2: sample has {sft_length(tok, **rows[1])} tokens; cutting it to")
    assert "leaves no response token" in str(e.value)
    ds = SFTDataset(path, tok, TEMPLATE, max_length=limit, truncation="right", on_error="skip")
    assert (len(ds), ds.num_skipped) == (1, 1)


def test_truncation_error_is_not_silenced_by_skip_mode(tok, tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", ["bad", {"prompt": "sort: 7 2 9 4", "response": "2 4 7 9"}])
    with pytest.raises(DataError, match=r"sft.jsonl:2: sample has \d+ tokens, max_length is 5"):
        SFTDataset(path, tok, TEMPLATE, max_length=5, on_error="skip")


def test_dataset_with_no_usable_sample_fails(tok, tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", ["bad", {"prompt": "x"}])
    with pytest.raises(DataError, match=r"sft.jsonl: no usable samples \(2 skipped: 2 bad rows \(first: .*sft.jsonl:1: inv"):
        SFTDataset(path, tok, TEMPLATE, max_length=64, on_error="skip")


def test_bad_options_are_config_errors(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "hello there"}])
    with pytest.raises(ConfigError, match="truncation='left'"):
        SFTDataset(path, tok, TEMPLATE, max_length=8, truncation="left")
    with pytest.raises(ConfigError, match="max_length=0"):
        SFTDataset(path, tok, TEMPLATE, max_length=0)
    with pytest.raises(ConfigError, match="truncation='right'"):
        PromptDataset(path, tok, TEMPLATE, max_length=8, truncation="right")


def test_preference_masks_cover_only_the_response(tok, tmp_path):
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "thanks a lot"},
               {"role": "user", "content": "sort: 7 2 9 4"}]  # fmt: skip
    answer = [{"role": "assistant", "content": "2 4 7 9"}]
    rows = [{"prompt": "sort: 7 2 9 4", "chosen": "2 4 7 9", "rejected": "2 4 9"},
            {"prompt": history, "chosen": answer, "rejected": "the answer is 42"}]  # fmt: skip
    ds = PreferenceDataset(write_lines(tmp_path / "pref.jsonl", rows), tok, TEMPLATE, max_length=64)
    for item, row in zip(ds, rows):
        for side in ("chosen", "rejected"):
            ids, mask = item[f"{side}_ids"], item[f"{side}_mask"].bool()
            want = row[side] if isinstance(row[side], str) else row[side][0]["content"]
            assert tok.decode(ids[mask].tolist()) == want  # history's assistant turn is not in the mask
            assert ids[mask][-1] == tok.eos_id
            prompt_ids = TEMPLATE.render_prompt(tok, row["prompt"])
            assert ids[: len(prompt_ids)].tolist() == prompt_ids


def test_preference_too_long_names_the_side(tok, tmp_path):
    row = {"prompt": "sort: 7 2 9 4", "chosen": "2 4 7 9", "rejected": "0 1 2 3 4 5 6 7 8 9"}
    path = write_lines(tmp_path / "pref.jsonl", [row])
    n_chosen = sft_length(tok, row["prompt"], row["chosen"])
    n_rejected = sft_length(tok, row["prompt"], row["rejected"])
    with pytest.raises(DataError) as e:
        PreferenceDataset(path, tok, TEMPLATE, max_length=n_chosen)
    assert str(e.value).startswith(f"{path}:1: rejected has {n_rejected} tokens, max_length is {n_chosen}")


def test_prompt_dataset_items_and_drop(tok, tmp_path):
    rows = [{"prompt": "sort: 7 2 9 4", "answer": "2 4 7 9", "k": 1}, {"prompt": "sort: 7 2 9 4 0 1 2 3 4 5 6"}]
    path = write_lines(tmp_path / "p.jsonl", rows)
    limit = len(TEMPLATE.render_prompt(tok, rows[0]["prompt"]))
    ds = PromptDataset(path, tok, TEMPLATE, max_length=limit, truncation="drop")
    assert (len(ds), ds.num_skipped) == (1, 1)
    assert ds[0]["prompt_ids"].tolist() == TEMPLATE.render_prompt(tok, rows[0]["prompt"])
    assert (ds[0]["answer"], ds[0]["meta"]) == ("2 4 7 9", {"k": 1})
    with pytest.raises(DataError, match=r"p.jsonl:2: prompt has \d+ tokens, max_length is"):
        PromptDataset(path, tok, TEMPLATE, max_length=limit)


# ---------------------------------------------------------------- collation


def test_pad_right_and_too_long():
    out = pad_right([torch.tensor([1, 2, 3]), torch.tensor([4])], 5, -1)
    assert out.tolist() == [[1, 2, 3, -1, -1], [4, -1, -1, -1, -1]]
    with pytest.raises(ConfigError, match="4 tokens does not fit seq_length=3"):
        pad_right([torch.arange(4)], 3, 0)


def test_collate_sft_against_naive_padding():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0.0, 1.0, 1.0])},
             {"input_ids": torch.tensor([8, 9]), "loss_mask": torch.tensor([0.0, 1.0])}]  # fmt: skip
    b = collate_sft(items, seq_length=4, pad_id=0)
    assert b["tokens"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert b["loss_mask"].dtype == torch.float and b["tokens"].dtype == torch.long


def test_collate_preference_stacks_chosen_then_rejected_with_last_index():
    eos = pad = 3  # pad == EOS (a vocabulary without a pad piece): last_index must not look at values
    items = [
        {"chosen_ids": torch.tensor([1, 5, 3]), "chosen_mask": torch.tensor([0.0, 1, 1]),
         "rejected_ids": torch.tensor([1, 6, 6, 3]), "rejected_mask": torch.tensor([0.0, 1, 1, 1])},
        {"chosen_ids": torch.tensor([1, 7, 8, 9, 3]), "chosen_mask": torch.tensor([0.0, 0, 1, 1, 1]),
         "rejected_ids": torch.tensor([1, 3]), "rejected_mask": torch.tensor([0.0, 1])},
    ]  # fmt: skip
    b = collate_preference(items, seq_length=6, pad_id=pad)
    rows = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    assert b["tokens"].shape == (4, 6)
    for i, row in enumerate(rows):
        assert b["tokens"][i, : len(row)].tolist() == row.tolist()
        assert b["last_index"][i] == len(row) - 1 and b["tokens"][i, b["last_index"][i]] == eos
    assert b["loss_mask"][:, -1].sum() == 0 and b["loss_mask"].sum() == sum(
        m.sum() for it in items for m in (it["chosen_mask"], it["rejected_mask"]))  # fmt: skip


def test_collate_prompts_pads_to_longest():
    items = [{"prompt_ids": torch.tensor([2, 4, 5]), "answer": "a", "meta": {}},
             {"prompt_ids": torch.tensor([2, 5]), "answer": None, "meta": {"k": 1}}]  # fmt: skip
    b = collate_prompts(items, pad_id=0)
    assert b["prompt_ids"].tolist() == [[2, 4, 5], [2, 5, 0]]
    assert b["prompt_lengths"].tolist() == [3, 2]
    assert (b["answer"], b["meta"]) == (["a", None], [{}, {"k": 1}])
