"""Row readers: every format gives the JSONL path's datasets; bad rows name file, row and
column; column mapping (nested keys, verl's RL schema); BOM; chosen == rejected."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megarlhf.config import ConfigError, DataConfig, DataError
from megarlhf.data import readers
from megarlhf.data.chat import ChatTemplate
from megarlhf.data.datasets import PreferenceDataset, PromptDataset, SFTDataset
from megarlhf.data.jsonl import parse_preference, parse_sft
from megarlhf.data.readers import Records, read_jsonl
from megarlhf.data.tokenizer import load_tokenizer, train_sentencepiece

TEMPLATE = ChatTemplate()
CORPUS = ["sort: 7 2 9 4", "2 4 7 9", "what is the answer", "the answer is 42", "hello there", "thanks a lot"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20) + "\n")
    return load_tokenizer(train_sentencepiece([d / "corpus.txt"], d / "sp", 60, "bpe"))


def user(text):
    return [{"role": "user", "content": text}]


# Each column has one type (columnar formats need it); SFT mixes both forms, so the other
# form's columns are null in a columnar file and absent in JSONL.
SFT_ROWS = [
    {"prompt": "sort: 7 2 9 4", "response": "2 4 7 9"},
    {"messages": user("what is the answer") + [{"role": "assistant", "content": "the answer is 42"}]},
    {"prompt": "hello there", "response": "thanks a lot"},
]
PREF_ROWS = [
    {"prompt": user("sort: 7 2 9 4"), "chosen": "2 4 7 9", "rejected": "2 4 9"},
    {"prompt": user("what is the answer"), "chosen": "the answer is 42", "rejected": "hello there"},
]
PROMPT_ROWS = [
    {"prompt": user("sort: 7 2 9 4"), "answer": "2 4 7 9", "id": 0},
    {"prompt": user("what is the answer"), "answer": "42", "id": 1},
]


def filled(rows):
    """Rows as a columnar file holds them: every column in every row, null where absent."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_jsonl(path, rows, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def write(fmt, path, rows):
    """`rows` in format `fmt`; returns the name a user would give."""
    if fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=2))  # one object spans several lines
        return str(path)
    table = pa.Table.from_pylist(filled(rows))
    if fmt == "parquet":
        pq.write_table(table, path.with_suffix(".parquet"), row_group_size=2)  # several row groups
        return str(path.with_suffix(".parquet"))
    if fmt in ("arrow_file", "arrow_stream"):
        new = pa.ipc.new_file if fmt == "arrow_file" else pa.ipc.new_stream
        with new(str(path.with_suffix(".arrow")), table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
        return str(path.with_suffix(".arrow"))
    if fmt == "save_to_disk":
        import datasets

        datasets.Dataset(table).save_to_disk(str(path))
        return str(path)
    if fmt == "hub_local":  # datasets.load_dataset on a local folder: the hub path without a network
        path.mkdir()
        pq.write_table(table, path / "train.parquet")
        return f"hub:{path}@train"
    raise AssertionError(fmt)


FORMATS = ["json", "parquet", "arrow_file", "arrow_stream", "save_to_disk", "hub_local"]
DATASETS = [(SFTDataset, SFT_ROWS), (PreferenceDataset, PREF_ROWS), (PromptDataset, PROMPT_ROWS)]


def same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_jsonl_datasets(tok, tmp_path, fmt):
    for cls, rows in DATASETS:
        oracle = cls(write_jsonl(tmp_path / f"{cls.__name__}.jsonl", rows), tok, TEMPLATE, max_length=64)
        source = write(fmt, tmp_path / f"{cls.__name__}_{fmt}", rows)
        ds = cls(source, tok, TEMPLATE, max_length=64)
        same_items(list(ds), list(oracle))
        if fmt != "json":  # JSON text is located by line, columnar data by row from 0
            assert [str(w) for w in ds.locations] == [f"{source} row {i}" for i in range(len(rows))]


def test_json_array_locates_objects_by_line_and_stops_at_a_syntax_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  7,\n  {"prompt": "c",\n   "response": "d"}\n]\n')
    records = Records(path, parse_sft, on_error="skip")
    assert [w.index for w, _ in records] == [2, 4]
    assert records.summary().startswith(f"1 skipped: 1 bad rows (first: {path}:3: expected a JSON object, got number")
    path.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": "c" "response": "d"}]')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON: Expecting ',' delimiter .* cannot be read past"):
        list(Records(path, parse_sft, on_error="skip"))


# ---------------------------------------------------------------- bad columnar rows


def columnar(fmt, path, table):
    if fmt == "parquet":
        pq.write_table(table, path.with_suffix(".parquet"), row_group_size=1)
        return str(path.with_suffix(".parquet"))
    if fmt == "arrow":
        with pa.ipc.new_stream(str(path.with_suffix(".arrow")), table.schema) as w:
            w.write_table(table, max_chunksize=1)
        return str(path.with_suffix(".arrow"))
    import datasets

    datasets.Dataset(table).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "save_to_disk"])
@pytest.mark.parametrize(
    "columns, reason",
    [
        ({"prompt": ["a", "b", "c"]}, "missing key 'response' (keys present: ['prompt'])"),
        ({"prompt": ["a", "b", "c"], "response": pa.array([1, 2, 3])}, "'response' must be a string, got number"),
        ({"prompt": ["a", "b", None], "response": ["x", "y", "z"]}, "'prompt' must be a string, got null"),
    ],
    ids=["missing_column", "wrong_type", "null"],
)  # fmt: skip
def test_bad_rows_name_file_row_and_column(tok, tmp_path, fmt, columns, reason):
    source = columnar(fmt, tmp_path / "sft", pa.table(columns))
    bad_row = 2 if reason.endswith("null") else 0
    with pytest.raises(DataError) as e:
        SFTDataset(source, tok, TEMPLATE, max_length=64)
    assert str(e.value) == f"{source} row {bad_row}: {reason}"
    if bad_row:
        ds = SFTDataset(source, tok, TEMPLATE, max_length=64, on_error="skip")
        assert (len(ds), ds.num_skipped, ds.lines) == (2, 1, [0, 1])
        assert ds.skip_summary() == f"1 skipped: 1 bad rows (first: {source} row 2: {reason})"


def test_parquet_folder_reads_files_in_order_and_rows_per_file(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 2)  # rows cross record-batch boundaries
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"sort: {i}", "response": str(i)} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows[:5]), folder / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows[5:]), folder / "train-00001-of-00002.parquet")
    records = Records(folder, parse_sft)
    assert records.total == 7
    got = [(str(w), r.messages[0]["content"]) for w, r in records]
    want = [(f"{folder}/train-0000{i // 5}-of-00002.parquet row {i % 5}", f"sort: {i}") for i in range(7)]
    assert got == want


# ---------------------------------------------------------------- column mapping


def verl_gsm8k_rows():
    """verl's examples/data_preprocess/gsm8k.py schema."""
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"content": f"what is {a} + {b}? Let's think step by step", "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(a + b), "style": "rule"},
            "extra_info": {"answer": f"{a} + {b} = #### {a + b}", "index": i, "question": f"{a} + {b}",
                           "split": "train"},
        }
        for i, (a, b) in enumerate([(2, 3), (4, 4), (1, 9)])
    ]  # fmt: skip


def test_verl_rl_parquet_is_a_prompt_file_with_nested_answer_key(tok, tmp_path):
    rows = verl_gsm8k_rows()
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    columns = DataConfig(answer_key="reward_model.ground_truth").columns()
    ds = PromptDataset(path, tok, TEMPLATE, max_length=64, columns=columns)
    assert len(ds) == 3
    for item, row in zip(ds, rows):
        assert item["prompt_ids"].tolist() == TEMPLATE.render_prompt(tok, row["prompt"])
        assert item["prompt_text"] == row["prompt"][0]["content"]
        assert item["answer"] == row["reward_model"]["ground_truth"]
        assert item["meta"] == {k: row[k] for k in ("data_source", "ability", "reward_model", "extra_info")}
    # without the mapping the answer is absent (None); with it, a row lacking it is an error
    assert PromptDataset(path, tok, TEMPLATE, max_length=64)[0]["answer"] is None
    rows[1]["reward_model"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        PromptDataset(path, tok, TEMPLATE, max_length=64, columns=columns)
    assert str(e.value).startswith(f"{path} row 1: column 'reward_model.ground_truth' (data.answer_key) is missing")


def test_renamed_columns_and_errors_name_the_file_column(tok, tmp_path):
    rows = [{"question": "sort: 7 2 9 4", "better": "2 4 7 9", "worse": "2 4 9"},
            {"question": "hello there", "better": "thanks a lot", "worse": None}]  # fmt: skip
    cfg = DataConfig(prompt_key="question", chosen_key="better", rejected_key="worse")
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    oracle = PreferenceDataset(
        write_jsonl(tmp_path / "o.jsonl", [{"prompt": r["question"], "chosen": r["better"], "rejected": r["worse"]}
                                           for r in rows[:1]]), tok, TEMPLATE, max_length=64,
    )  # fmt: skip
    ds = PreferenceDataset(path, tok, TEMPLATE, max_length=64, on_error="skip", columns=cfg.columns())
    same_items(list(ds), list(oracle))
    with pytest.raises(DataError) as e:
        PreferenceDataset(path, tok, TEMPLATE, max_length=64, columns=cfg.columns())
    assert str(e.value) == (
        f"{path}:2: 'rejected' must be an array of messages, got null (column 'worse', set by data.rejected_key)"
    )


def test_bad_column_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.answer_key = 'reward_model.'"):
        DataConfig(answer_key="reward_model.")


# ---------------------------------------------------------------- issue 27: BOM, chosen == rejected


def test_jsonl_with_a_utf8_bom_is_accepted(tok, tmp_path):
    plain = SFTDataset(write_jsonl(tmp_path / "plain.jsonl", SFT_ROWS), tok, TEMPLATE, max_length=64)
    bom = SFTDataset(write_jsonl(tmp_path / "bom.jsonl", SFT_ROWS, prefix=b"\xef\xbb\xbf"), tok, TEMPLATE, 64)
    same_items(list(bom), list(plain))
    assert bom.lines == [1, 2, 3]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(SFT_ROWS).encode())
    same_items(list(SFTDataset(tmp_path / "bom.json", tok, TEMPLATE, 64)), list(plain))


def test_chosen_equal_to_rejected_is_named_or_counted(tok, tmp_path):
    same = {"prompt": "hello there", "chosen": "thanks a lot",
            "rejected": [{"role": "assistant", "content": "thanks a lot"}]}  # equal once parsed
    path = write_jsonl(tmp_path / "p.jsonl", [PREF_ROWS[0] | {"prompt": "sort: 7 2 9 4"}, same, "not json", same])
    path.write_text(path.read_text().replace('"not json"', "not json"))
    with pytest.raises(DataError, match=rf"^{path}:2: 'chosen' equals 'rejected': the pair expresses no preference"):
        PreferenceDataset(path, tok, TEMPLATE, max_length=64)
    ds = PreferenceDataset(path, tok, TEMPLATE, max_length=64, on_error="skip")
    assert (len(ds), ds.num_skipped, ds.lines) == (1, 3, [1])
    assert ds.skip_summary().startswith(f"3 skipped: 2 chosen equals rejected (first: {path}:2: 'chosen' equals")
    assert f"1 bad rows (first: {path}:3: invalid JSON" in ds.skip_summary()
    records, skipped = read_jsonl(path, parse_preference, on_error="skip")
    assert ([n for n, _ in records], skipped) == ([1], 3)


# ---------------------------------------------------------------- schemas of Hub preference / SFT sets


def test_prompts_repeated_in_completions_or_implicit_give_the_explicit_pairs(tok, tmp_path):
    a = [{"role": "assistant", "content": "2 4 7 9"}]
    b = [{"role": "assistant", "content": "2 4 9"}]
    history = user("hello there") + [{"role": "assistant", "content": "thanks a lot"}] + user("sort: 7 2 9 4")
    q = "sort: 7 2 9 4"
    explicit = [{"prompt": q, "chosen": a, "rejected": b}, {"prompt": history, "chosen": a, "rejected": b}]
    oracle = PreferenceDataset(write_jsonl(tmp_path / "o.jsonl", explicit), tok, TEMPLATE, max_length=64)
    # HuggingFaceH4/ultrafeedback_binarized: the prompt again at the start of each completion
    repeated = [{"prompt": q, "chosen": user(q) + a, "rejected": user(q) + b},
                {"prompt": history, "chosen": history + a, "rejected": history + b}]  # fmt: skip
    # trl-lib/ultrafeedback_binarized: no prompt column, the shared messages are the prompt
    implicit = [{"chosen": user(q) + a, "rejected": user(q) + b}, {"chosen": history + a, "rejected": history + b}]
    # (one Parquet column has one type: the string-and-messages prompts of `repeated` go in JSONL)
    for source in (write_jsonl(tmp_path / "r.jsonl", repeated), write("parquet", tmp_path / "implicit", implicit)):
        same_items(list(PreferenceDataset(source, tok, TEMPLATE, max_length=64)), list(oracle))
    with pytest.raises(DataError, match=r"row 0: no 'prompt', and 'chosen' and 'rejected' share no leading messages"):
        PreferenceDataset(write("parquet", tmp_path / "none", [{"chosen": a, "rejected": b}]), tok, TEMPLATE, 64)


def test_sft_messages_with_their_first_user_text_as_prompt(tok, tmp_path):
    chat = SFT_ROWS[1]["messages"]
    row = {"prompt": chat[0]["content"], "prompt_id": "x", "messages": chat}  # HuggingFaceH4/ultrachat_200k's
    ds = SFTDataset(write("parquet", tmp_path / "uc", [row]), tok, TEMPLATE, 64)
    same_items(list(ds), list(SFTDataset(write_jsonl(tmp_path / "o.jsonl", SFT_ROWS[1:2]), tok, TEMPLATE, 64)))


# ---------------------------------------------------------------- sources that cannot be read


def test_unreadable_sources_say_what_to_do(tmp_path, monkeypatch):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a datasets.DatasetDict folder with splits \['train'\]; point .*/dd/train"):
        Records(tmp_path / "dd", parse_sft)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a datasets.save_to_disk folder"):
        Records(tmp_path / "empty", parse_sft)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        Records(tmp_path / "bad.parquet", parse_sft)
    # No network (or the Hub down): fails at once with the way out, not after retries.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    way_out = r"load_dataset\('org/name', split='test'\).save_to_disk\('DIR'\)"
    with pytest.raises(DataError, match=rf"hub:org/name@test: the Hugging Face Hub is unreachable .*{way_out}"):
        Records("hub:org/name@test", parse_sft)
    with pytest.raises(ConfigError, match="expected hub:NAME"):
        Records("hub:@train", parse_sft)
    modules = __import__("sys").modules
    monkeypatch.setitem(modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ConfigError, match="needs the `pyarrow` package: pip install pyarrow"):
        Records(tmp_path / "bad.parquet", parse_sft)
    monkeypatch.setitem(modules, "datasets", None)  # nor the megarlhf[datasets] extra
    with pytest.raises(ConfigError, match=r"needs the `datasets` package: pip install 'megarlhf\[datasets\]'"):
        Records(tmp_path / "dd" / "train", parse_sft)
