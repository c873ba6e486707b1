"""prepare_data: token streams, the cache, and crash safety."""

from __future__ import annotations

import numpy as np
import pytest

from nestlearn.config.schema import DataConfig
from nestlearn.data import (
    EOS,
    BPETokenizer,
    ByteTokenizer,
    Document,
    prepare_data,
    prepare_text,
    read_documents,
    split_documents,
    stream_dtype,
)
from nestlearn.data import prepare as prepare_module
from nestlearn.data.cache import cache_root
from nestlearn.errors import NestlearnWarning


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts of tokenizing (prepare_text) and tokenizer building (build_tokenizer) calls."""
    counts = {"prepare_text": 0, "build_tokenizer": 0}
    for name in counts:
        original = getattr(prepare_module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(prepare_module, name, counted)
    return counts


@pytest.fixture
def corpus_cfg(make_tree, tmp_path) -> DataConfig:
    files = {f"doc{i}.txt": f"document {i}\n" + "word " * (i + 1) + "\n" for i in range(12)}
    root = make_tree(files)
    return DataConfig(source=str(root), tokenizer="byte", cache_dir=str(tmp_path / "cache"))


def test_streams_are_documents_joined_by_eos(corpus_cfg):
    corpus = prepare_data(corpus_cfg, progress=False)
    tok = corpus.tokenizer
    train, val = split_documents(read_documents(corpus_cfg), 0.05, 0)
    for stream, docs in ((corpus.train, train), (corpus.val, val)):
        assert stream.dtype == np.uint16 and not stream.flags.writeable
        assert tok.decode(stream.tolist()) == "".join(d.text + EOS for d in docs)
        assert int(stream[-1]) == tok.eos_id
        assert (stream == tok.eos_id).sum() == len(docs)
    assert (corpus.train_docs, corpus.val_docs) == (len(train), len(val))
    assert corpus.train_bytes == sum(len(d.text.encode()) for d in train)
    assert corpus.val_bytes == tok.token_byte_lengths()[corpus.val].sum()


def test_second_call_hits_the_cache(corpus_cfg, calls):
    first = prepare_data(corpus_cfg, progress=False)
    assert calls["prepare_text"] == 2
    entry = next((cache_root(corpus_cfg) / "tokens").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    second = prepare_data(corpus_cfg, progress=False)
    assert calls["prepare_text"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert first.fingerprint == second.fingerprint


def test_given_tokenizer_is_used_and_cached(corpus_cfg, calls):
    given = ByteTokenizer()
    corpus = prepare_data(corpus_cfg, tokenizer=given, progress=False)
    assert corpus.tokenizer is given
    prepare_data(corpus_cfg, tokenizer=ByteTokenizer(), progress=False)
    # The byte config resolves to an identical tokenizer, so it shares the entry too.
    prepare_data(corpus_cfg, progress=False)
    assert calls["prepare_text"] == 2


def test_bpe_is_trained_once_and_gets_its_own_entry(corpus_cfg, calls):
    bpe_cfg = DataConfig(**{**vars(corpus_cfg), "tokenizer": "bpe", "vocab_size": 300})
    byte = prepare_data(corpus_cfg, progress=False)
    bpe = prepare_data(bpe_cfg, progress=False)
    again = prepare_data(bpe_cfg, progress=False)
    assert calls["build_tokenizer"] == 2  # byte once, BPE once
    assert calls["prepare_text"] == 4  # two splits per tokenizer
    assert isinstance(bpe.tokenizer, BPETokenizer)
    assert again.tokenizer.fingerprint() == bpe.tokenizer.fingerprint()
    assert len(list((cache_root(corpus_cfg) / "tokens").iterdir())) == 2
    assert byte.tokenizer.decode(byte.val.tolist()) == bpe.tokenizer.decode(bpe.val.tolist())


def test_an_incomplete_entry_is_rebuilt(corpus_cfg, calls):
    first = prepare_data(corpus_cfg, progress=False)
    entry = next((cache_root(corpus_cfg) / "tokens").iterdir())
    # A prepare killed after the arrays but before meta.json left no meta.
    (entry / "meta.json").unlink()
    assert np.array_equal(prepare_data(corpus_cfg, progress=False).train, first.train)
    assert calls["prepare_text"] == 4
    # A torn array (not possible with atomic writes, but a disk can lie) is named and rebuilt.
    (entry / "train.npy").write_bytes((entry / "train.npy").read_bytes()[:-10])
    with pytest.warns(NestlearnWarning, match=r"train\.npy cannot be read .*; rebuilding it"):
        assert np.array_equal(prepare_data(corpus_cfg, progress=False).train, first.train)
    assert calls["prepare_text"] == 6


def test_a_damaged_cached_tokenizer_is_retrained(corpus_cfg, calls):
    bpe_cfg = DataConfig(**{**vars(corpus_cfg), "tokenizer": "bpe", "vocab_size": 300})
    first = prepare_data(bpe_cfg, progress=False)
    (path,) = (cache_root(bpe_cfg) / "tokenizers").glob("*.json")
    path.write_text("{broken")
    with pytest.warns(NestlearnWarning, match=f"cached tokenizer {path} is corrupt"):
        second = prepare_data(bpe_cfg, progress=False)
    assert calls["build_tokenizer"] == 2
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_cache_dir_falls_back_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NESTLEARN_CACHE", str(tmp_path / "env"))
    assert cache_root(DataConfig()) == tmp_path / "env"
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("NESTLEARN_CACHE")
    assert str(cache_root(DataConfig())).endswith(".cache/nestlearn")


def test_stdlib_default_source_with_a_cap(tmp_path):
    cfg = DataConfig(max_bytes=200_000, tokenizer="byte", cache_dir=str(tmp_path))
    corpus = prepare_data(cfg, progress=False)
    assert corpus.train_docs >= 1 and corpus.val_docs >= 1
    assert len(corpus.train) == corpus.train_bytes + corpus.train_docs


def test_prepare_text_and_stream_dtype():
    tok = ByteTokenizer()
    stream = prepare_text([Document("a", "hi"), Document("b", "é")], tok)
    assert stream.tolist() == [104, 105, 256, 0xC3, 0xA9, 256]
    assert prepare_text(["hi", "é"], tok).tolist() == stream.tolist()
    assert prepare_text([], tok).size == 0
    assert stream_dtype(65_536) == np.uint16 and stream_dtype(65_537) == np.uint32
