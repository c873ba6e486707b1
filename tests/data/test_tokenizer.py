"""Byte and BPE tokenizers: exact round trips, byte accounting, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.config.schema import DataConfig
from nestlearn.data import (
    EOS,
    BPETokenizer,
    ByteTokenizer,
    Document,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    read_documents,
)
from nestlearn.errors import DataError

TRICKY = [
    "",
    " ",
    "  x",
    "\t\tdef f():\n\treturn 1\r\n",
    "\n\n\n",
    "a<|endoftext|>b",
    "日本語 🎉 é",
]
texts = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u3000aé日🎉<|>_")), max_size=40),
)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    docs = read_documents(DataConfig(max_bytes=200_000))
    return BPETokenizer.train(docs, vocab_size=400, max_bytes=1_000_000, seed=0)


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request, bpe) -> Tokenizer:
    return ByteTokenizer() if request.param == "byte" else bpe


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_round_trip_and_byte_accounting(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_byte_lengths()[ids].sum() == len(text.encode("utf-8"))
    assert tokenizer.eos_id not in ids


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_texts(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_byte_lengths_and_eos(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (tokenizer.vocab_size,)
    assert lengths[tokenizer.eos_id] == 0 and (np.delete(lengths, tokenizer.eos_id) >= 1).all()
    assert tokenizer.decode([*tokenizer.encode("a"), tokenizer.eos_id]) == "a" + EOS


def test_bpe_compresses_code(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    text = "def forward(self, x):\n    return self.linear(x)\n"
    assert len(bpe.encode(text)) < 0.75 * len(text.encode())


def test_byte_tokenizer_basics():
    tok = ByteTokenizer()
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == "\ufffd"


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tokenizer)
    assert loaded.fingerprint() == tokenizer.fingerprint() == load_tokenizer(path).fingerprint()
    for text in TRICKY:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert np.array_equal(loaded.token_byte_lengths(), tokenizer.token_byte_lengths())


def test_bpe_training_is_deterministic(bpe):
    docs = read_documents(DataConfig(max_bytes=200_000))
    again = BPETokenizer.train(docs, vocab_size=400, max_bytes=1_000_000, seed=0)
    assert again.fingerprint() == bpe.fingerprint()
    other = BPETokenizer.train(docs, vocab_size=300, max_bytes=1_000_000, seed=0)
    assert other.fingerprint() != bpe.fingerprint()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is corrupt"),
        ('{"model": {"type": "BPE"', "is corrupt"),
        ('{"model": 3}', "is corrupt"),
        ("[1, 2]", "is not a nestlearn tokenizer"),
    ],
)
def test_corrupt_tokenizer_file_raises_data_error_naming_it(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_truncated_bpe_file_raises(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json()[:-200])
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(path)


def test_missing_tokenizer_file_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "absent.json")


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "wordlevel.json"
    HFTokenizer(models.WordLevel({"a": 0, EOS: 1}, unk_token="a")).save(str(path))
    with pytest.raises(DataError, match="byte-level BPE"):
        load_tokenizer(path)


def test_build_tokenizer_choices():
    docs = [Document("a", "hello world\n" * 20)]
    assert isinstance(build_tokenizer(DataConfig(tokenizer="byte"), docs), ByteTokenizer)
    bpe = build_tokenizer(DataConfig(tokenizer="bpe", vocab_size=300), docs)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size <= 300
    with pytest.raises(DataError, match=r"unknown data\.tokenizer"):
        build_tokenizer(DataConfig(tokenizer="wordpiece"), docs)
    with pytest.raises(DataError, match="at least 257"):
        build_tokenizer(DataConfig(tokenizer="bpe", vocab_size=100), docs)


def test_byte_json_is_small_and_tagged():
    spec = json.loads(ByteTokenizer().to_json())
    assert spec["format"] == "nestlearn-byte-tokenizer"
