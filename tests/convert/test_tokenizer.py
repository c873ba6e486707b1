"""Pretrained tokenizers (``tokenizer.json`` of Llama 2/3, Mistral, Qwen2) as nestlearn ones."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer as RustTokenizer

from nestlearn.convert import PretrainedTokenizer, resolve_tokenizer
from nestlearn.data.document import Document
from nestlearn.data.tokenizer import BPETokenizer, load_tokenizer
from nestlearn.errors import DataError
from tests.convert.tiny_tokenizers import TEXT, byte_level_bpe, sentencepiece_bpe

SAMPLE = " leading space, café, 🙂 and </s> <|endoftext|> <|end_of_text|> as plain text"
MAKERS = {
    "sentencepiece": sentencepiece_bpe,
    "llama3": byte_level_bpe,
    "qwen2": lambda: byte_level_bpe(nfc=True),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_encodes_like_tokenizers_and_round_trips(name):
    rust = MAKERS[name]()
    tokenizer = PretrainedTokenizer(RustTokenizer.from_str(rust.to_str()))
    ids = tokenizer.encode(SAMPLE)
    # Special strings in the text stay text: no special id is ever emitted.
    assert tokenizer.eos_id not in ids
    assert tokenizer.token_byte_lengths()[ids].min() > 0
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.encode_batch([SAMPLE, TEXT[:50]]) == [ids, tokenizer.encode(TEXT[:50])]
    # The byte count of the ids is the text's (SentencePiece: + the one space it prepends).
    extra = 1 if name == "sentencepiece" else 0
    assert tokenizer.token_byte_lengths()[ids].sum() == len(SAMPLE.encode("utf-8")) + extra
    assert tokenizer.token_byte_lengths()[tokenizer.eos_id] == 0


def test_saved_and_loaded_through_load_tokenizer(tmp_path):
    for name, make in MAKERS.items():
        path = tmp_path / f"{name}.json"
        tokenizer = PretrainedTokenizer(make())
        tokenizer.save(path)
        loaded = load_tokenizer(path)
        assert isinstance(loaded, PretrainedTokenizer), name
        assert loaded.fingerprint() == tokenizer.fingerprint()
        assert loaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    # nestlearn's own byte-level BPE still loads as itself.
    docs = [Document("a", TEXT)]
    bpe = BPETokenizer.train(docs, vocab_size=300, max_bytes=0, seed=0)
    bpe.save(tmp_path / "ours.json")
    assert type(load_tokenizer(tmp_path / "ours.json")) is BPETokenizer


def test_unusable_tokenizers_are_refused_with_the_fix(tmp_path):
    from tokenizers import models

    word = RustTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match=r"byte-level BPE.*--tokenizer byte"):
        PretrainedTokenizer(word)
    # SentencePiece-style without byte fallback cannot map every id back to bytes.
    spec = json.loads(sentencepiece_bpe().to_str())
    spec["model"]["byte_fallback"] = False
    with pytest.raises(DataError, match="byte fallback"):
        PretrainedTokenizer(RustTokenizer.from_str(json.dumps(spec)))
    # No end-of-text token: named, since documents are separated by it.
    spec = json.loads(byte_level_bpe().to_str())
    for added in spec["added_tokens"]:
        added["special"] = False
    with pytest.raises(DataError, match=r"end-of-text special token.*</s>"):
        PretrainedTokenizer(RustTokenizer.from_str(json.dumps(spec)))
    path = tmp_path / "tokenizer.json"
    word.save(str(path))
    with pytest.raises(DataError, match=r"SentencePiece BPEs with byte fallback"):
        resolve_tokenizer("auto", tmp_path)
