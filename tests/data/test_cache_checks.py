"""The token cache checks what it holds: a changed file is named and rebuilt, never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nestlearn.config.schema import DataConfig
from nestlearn.data import BPETokenizer, prepare_data
from nestlearn.data import prepare as prepare_module
from nestlearn.data.cache import array_digest, cache_root, checksum_path
from nestlearn.errors import DataError, NestlearnWarning


@pytest.fixture
def corpus_cfg(make_tree, tmp_path) -> DataConfig:
    files = {f"doc{i}.txt": f"document {i}\n" + "word " * (i + 3) + "\n" for i in range(12)}
    root = make_tree(files)
    return DataConfig(source=str(root), tokenizer="byte", cache_dir=str(tmp_path / "cache"))


def entry_of(cfg: DataConfig) -> Path:
    (entry,) = (cache_root(cfg) / "tokens").iterdir()
    return entry


def overwrite_data(path: Path, value: int) -> None:
    """Fill the array's data bytes with ``value`` in place: same size, same header."""
    array = np.load(path, mmap_mode="r")
    offset, shape, dtype = array.offset, array.shape, array.dtype
    del array
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.full(shape, value, dtype=dtype).tobytes())


def warned(record: pytest.WarningsRecorder) -> str:
    """The one NestlearnWarning issued."""
    (warning,) = [w for w in record if issubclass(w.category, NestlearnWarning)]
    return str(warning.message)


def test_zeroed_train_stream_is_named_and_rebuilt(corpus_cfg):
    first = prepare_data(corpus_cfg, progress=False)
    expected = np.array(first.train)
    path = entry_of(corpus_cfg) / "train.npy"
    size = path.stat().st_size
    overwrite_data(path, 0)
    assert path.stat().st_size == size and not np.load(path).any()
    with pytest.warns(NestlearnWarning) as record:
        second = prepare_data(corpus_cfg, progress=False)
    message = warned(record)
    assert message == (
        f"token cache file {path} is corrupt: its sha256 does not match meta.json; rebuilding it"
    )
    assert np.array_equal(second.train, expected)
    assert np.array_equal(np.load(path), expected)  # the file itself was rebuilt


def test_out_of_range_ids_are_reported_as_corruption_with_the_largest_id(corpus_cfg):
    prepare_data(corpus_cfg, progress=False)
    path = entry_of(corpus_cfg) / "val.npy"
    overwrite_data(path, 0xFFFF)
    with pytest.warns(NestlearnWarning) as record:
        corpus = prepare_data(corpus_cfg, progress=False)
    message = warned(record)
    assert message.startswith(f"token cache file {path} is corrupt")
    assert "its largest id 65535 is outside the tokenizer's 257 ids" in message
    assert int(corpus.val.max()) < corpus.tokenizer.vocab_size


def test_out_of_range_ids_are_caught_even_when_meta_was_rewritten_to_match(corpus_cfg):
    prepare_data(corpus_cfg, progress=False)
    entry = entry_of(corpus_cfg)
    overwrite_data(entry / "train.npy", 300)
    meta = json.loads((entry / "meta.json").read_text())
    meta["train_sha256"] = array_digest(np.load(entry / "train.npy"))
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(NestlearnWarning, match="its largest id 300 is outside the tokenizer's 257"):
        corpus = prepare_data(corpus_cfg, progress=False)
    assert int(corpus.train.max()) < 257


def test_a_stream_still_wrong_after_rebuilding_is_refused_by_name(corpus_cfg, monkeypatch):
    prepare_data(corpus_cfg, progress=False)
    path = entry_of(corpus_cfg) / "train.npy"
    overwrite_data(path, 0)
    original = prepare_module._write_streams

    def lying_disk(*args, **kwargs):
        original(*args, **kwargs)
        overwrite_data(path, 0)

    monkeypatch.setattr(prepare_module, "_write_streams", lying_disk)
    with (
        pytest.warns(NestlearnWarning),
        pytest.raises(DataError, match=r"train\.npy is corrupt.*right after it was written"),
    ):
        prepare_data(corpus_cfg, progress=False)


def test_array_digest_covers_dtype_shape_and_every_block(monkeypatch):
    monkeypatch.setattr("nestlearn.data.cache.HASH_BLOCK", 7)  # many blocks, a ragged last one
    a = np.arange(1000, dtype=np.uint16)
    b = a.copy()
    b[-1] ^= 1
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(b)
    assert array_digest(a) != array_digest(a.astype(np.uint32))
    assert array_digest(a) != array_digest(a.reshape(10, 100))


def bpe_cfg(cfg: DataConfig) -> DataConfig:
    return DataConfig(**{**vars(cfg), "tokenizer": "bpe", "vocab_size": 300})


def test_a_tokenizer_edited_into_another_valid_one_is_named_and_retrained(corpus_cfg):
    cfg = bpe_cfg(corpus_cfg)
    first = prepare_data(cfg, progress=False)
    (path,) = (cache_root(cfg) / "tokenizers").glob("*.json")
    assert checksum_path(path).is_file()
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # still a loadable BPE, but another one
    path.write_text(json.dumps(spec))
    with pytest.warns(NestlearnWarning) as record:
        second = prepare_data(cfg, progress=False)
    assert warned(record).startswith(f"cached tokenizer {path} is corrupt: its sha256 does not")
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_a_cached_tokenizer_without_a_checksum_is_kept_and_gets_one(corpus_cfg, monkeypatch):
    cfg = bpe_cfg(corpus_cfg)
    first = prepare_data(cfg, progress=False)
    (path,) = (cache_root(cfg) / "tokenizers").glob("*.json")
    checksum_path(path).unlink()  # a cache written before checksums existed

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    second = prepare_data(cfg, progress=False)
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert checksum_path(path).is_file()
