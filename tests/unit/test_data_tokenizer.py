"""Tokenizers: sentencepiece trained here, Hugging Face tokenizer.json built here, loader errors."""

import json

import pytest

from megarlhf.config import ConfigError
from megarlhf.data.synthetic import write_synthetic
from megarlhf.data.tokenizer import (
    CHAT_MARKERS, HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece,
)  # fmt: skip

SIZES = dict(n_sft=300, n_pref_train=100, n_pref_test=20, n_prompts_train=50, n_prompts_test=20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return write_synthetic(out, seed=0, **SIZES)["tokenizer_corpus"]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp_model(request, corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "sp"
    return train_sentencepiece([corpus], prefix, vocab_size=64, model_type=request.param)


def test_sentencepiece_round_trip_and_special_ids(sp_model, corpus):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.token_to_id("<unk>") == 1
    lines = corpus.read_text().splitlines()
    for line in lines[:200]:
        ids = tok.encode(line)
        assert ids and not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)  # encode adds no specials
        assert tok.decode(ids) == line
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == line  # decode skips them
    assert max(tok.encode(" ".join(lines))) < tok.vocab_size <= 64


def test_sentencepiece_splits_digits_and_keeps_markers_whole(sp_model):
    tok = load_tokenizer(sp_model)
    for piece in CHAT_MARKERS.values():
        assert tok.token_to_id(piece) is not None
        assert tok.encode(piece)[-1] == tok.token_to_id(piece)  # one piece, not characters
    for digit in "0123456789":
        assert tok.token_to_id(digit) is not None
    ids = tok.encode("90817")
    assert [tok.decode([i]) for i in ids if tok.decode([i])] == list("90817")
    assert tok.token_to_id("no-such-piece") is None  # not the unk id


def test_sentencepiece_training_is_deterministic(corpus, tmp_path):
    # Same prefix both times: the .model records its own output prefix in the trainer spec.
    path = train_sentencepiece([corpus], tmp_path / "sp", 64, "bpe")
    with open(path, "rb") as f:
        first = f.read()
    train_sentencepiece([corpus], tmp_path / "sp", 64, "bpe")
    with open(path, "rb") as f:
        assert f.read() == first


def test_train_sentencepiece_rejects_bad_arguments(corpus, tmp_path):
    with pytest.raises(ConfigError, match="model_type='word'"):
        train_sentencepiece([corpus], tmp_path / "sp", 64, "word")
    with pytest.raises(ConfigError, match="not found.*missing.txt"):
        train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "sp", 64, "bpe")


def test_train_tokenizer_cli(corpus, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "tools" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(["--input", str(corpus), "--vocab-size", "40", "--output-prefix", str(tmp_path / "x" / "sp")])
    assert rc == 0 and (tmp_path / "x" / "sp.model").is_file()
    assert load_tokenizer(tmp_path / "x" / "sp.model").vocab_size <= 40
    missing = ["--input", str(tmp_path / "nope.txt"), "--vocab-size", "40", "--output-prefix", str(tmp_path / "y")]
    assert tool.main(missing) == 2


LINES = ["sort: 7 2 9 4", "2 4 7 9", "hello world again"]


def _hf_json(tmp_path, specials=("<pad>", "<unk>", "<s>", "</s>", *CHAT_MARKERS.values()), name="tokenizer.json"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(LINES, trainer=trainers.WordLevelTrainer(special_tokens=list(specials)))
    path = tmp_path / name
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip_by_file_and_directory(tmp_path):
    path = _hf_json(tmp_path)
    vocab = json.loads(path.read_text())["model"]["vocab"]
    for tok in (load_tokenizer(path), load_tokenizer(tmp_path)):
        assert isinstance(tok, HFTokenizer)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (vocab["<pad>"], vocab["<s>"], vocab["</s>"])
        assert tok.vocab_size == len(vocab)
        for line in LINES:
            ids = tok.encode(line)
            assert ids == [vocab[w] for w in line.split()]
            assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == line
        assert tok.token_to_id("<|assistant|>") == vocab["<|assistant|>"]
        assert tok.token_to_id("absent") is None


def test_hf_tokenizer_without_pad_pads_with_eos(tmp_path):
    tok = load_tokenizer(_hf_json(tmp_path, specials=("<unk>", "<s>", "</s>")))
    assert tok.pad_id == tok.eos_id == tok.token_to_id("</s>")


def test_hf_tokenizer_missing_bos_names_the_piece(tmp_path):
    path = _hf_json(tmp_path, specials=("<pad>", "<unk>", "</s>"))
    with pytest.raises(ConfigError, match=r"tokenizer.json: tokenizer has no BOS piece '<s>'"):
        load_tokenizer(path)
    tok = HFTokenizer(path, bos="</s>")  # configurable pieces
    assert tok.bos_id == tok.eos_id


def test_hf_tokenizer_rejects_pad_that_is_a_text_token(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"pad piece '<pad>' \(id 1\) is an ordinary text token"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.model'}: no such tokenizer file"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ConfigError, match=r"vocab.txt: unknown tokenizer type '.txt'; expected .model"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ConfigError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
