"""From ``DataConfig`` to memory-mapped token streams, tokenizing each corpus once.

:func:`prepare_data` reads the documents, splits them, gets a tokenizer (the one given, else a BPE
trained on the train split and cached), and returns the train and validation streams: every
document's ids followed by the eos id, concatenated, as read-only memory maps of cached ``.npy``
files. The cache is keyed by the corpus fingerprint (names, texts and split settings) and the
tokenizer fingerprint, so a second call with the same inputs only reads and hashes the corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nestlearn.config.schema import DataConfig
from nestlearn.data.cache import (
    cache_root,
    load_array,
    load_json,
    save_array,
    save_json,
    tokenizer_path,
    tokens_dir,
)
from nestlearn.data.corpus import Document, corpus_fingerprint, read_documents, split_documents
from nestlearn.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from nestlearn.errors import DataError

CACHE_FORMAT = 1
# Texts per encode_batch call are grouped up to this many bytes: large enough to keep every core
# busy, small enough that the Python id lists of one group stay a few tens of MB.
CHUNK_BYTES = 4 << 20
# Seconds of tokenizing before the progress bar appears (short jobs stay silent).
PROGRESS_DELAY = 1.0


@dataclass(frozen=True)
class TokenizedCorpus:
    """Token streams of the train and validation splits and what produced them."""

    train: np.ndarray  # [n_train_tokens] uint16/uint32, read-only memory map
    val: np.ndarray  # [n_val_tokens]
    tokenizer: Tokenizer
    train_bytes: int  # UTF-8 bytes of the train documents' text (eos excluded)
    val_bytes: int
    train_docs: int
    val_docs: int
    fingerprint: str  # corpus fingerprint (documents + split settings)


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_text(
    docs: Sequence[Document] | Sequence[str],
    tokenizer: Tokenizer,
    *,
    progress: bool = False,
    desc: str = "tokenizing",
) -> np.ndarray:
    """One in-memory token stream: each document's ids then the eos id, in order."""
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    sizes = [len(t.encode("utf-8")) for t in texts]
    dtype = stream_dtype(tokenizer.vocab_size)
    parts = []
    bar = tqdm(
        total=sum(sizes),
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=not progress,
        delay=PROGRESS_DELAY,
    )
    with bar:
        for start, stop in _chunks(sizes, CHUNK_BYTES):
            flat: list[int] = []
            for ids in tokenizer.encode_batch(texts[start:stop]):
                flat.extend(ids)
                flat.append(tokenizer.eos_id)
            parts.append(np.array(flat, dtype=dtype))
            bar.update(sum(sizes[start:stop]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def prepare_data(
    cfg: DataConfig, tokenizer: Tokenizer | None = None, progress: bool = True
) -> TokenizedCorpus:
    """Read, split and tokenize the corpus of ``cfg`` (cached), and memory-map the streams.

    ``tokenizer`` overrides ``cfg.tokenizer`` (e.g. a run's saved tokenizer for evaluation).
    """
    docs = read_documents(cfg)
    fingerprint = corpus_fingerprint(docs, cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    root = cache_root(cfg)
    if tokenizer is None:
        tokenizer = _cached_tokenizer(cfg, root, fingerprint, train_docs)
    entry = tokens_dir(root, fingerprint, tokenizer.fingerprint())
    streams = _load_streams(entry, fingerprint, tokenizer)
    if streams is None:
        _write_streams(entry, fingerprint, tokenizer, train_docs, val_docs, progress)
        streams = _load_streams(entry, fingerprint, tokenizer)
        if streams is None:
            raise DataError(f"token cache {entry} cannot be read back: check the disk or cache_dir")
    return TokenizedCorpus(
        train=streams[0],
        val=streams[1],
        tokenizer=tokenizer,
        train_bytes=_n_bytes(train_docs),
        val_bytes=_n_bytes(val_docs),
        train_docs=len(train_docs),
        val_docs=len(val_docs),
        fingerprint=fingerprint,
    )


def _cached_tokenizer(
    cfg: DataConfig, root: Path, fingerprint: str, train_docs: Sequence[Document]
) -> Tokenizer:
    """``cfg.tokenizer``; a BPE is trained once per (corpus, vocab_size, bpe_train_bytes)."""
    if cfg.tokenizer != "bpe":
        return build_tokenizer(cfg, train_docs)
    path = tokenizer_path(root, fingerprint, cfg.vocab_size, cfg.bpe_train_bytes)
    if path.exists():
        try:
            return load_tokenizer(path)
        except DataError:
            # A damaged cache file is not the user's input: retrain and overwrite it.
            pass
    tokenizer = build_tokenizer(cfg, train_docs)
    tokenizer.save(path)
    return tokenizer


def _write_streams(
    entry: Path,
    fingerprint: str,
    tokenizer: Tokenizer,
    train_docs: Sequence[Document],
    val_docs: Sequence[Document],
    progress: bool,
) -> None:
    """Tokenize both splits into ``entry``; meta.json last, so it marks a complete entry."""
    train = prepare_text(train_docs, tokenizer, progress=progress, desc="tokenizing train")
    val = prepare_text(val_docs, tokenizer, progress=progress, desc="tokenizing val")
    save_array(entry / "train.npy", train)
    save_array(entry / "val.npy", val)
    meta = {
        "format": CACHE_FORMAT,
        "corpus_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": train.dtype.name,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "train_bytes": _n_bytes(train_docs),
        "val_bytes": _n_bytes(val_docs),
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
    }
    save_json(entry / "meta.json", meta)


def _load_streams(
    entry: Path, fingerprint: str, tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (train, val) memory maps, or None unless the entry is complete and matches."""
    meta = load_json(entry / "meta.json")
    expected = {
        "format": CACHE_FORMAT,
        "corpus_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "dtype": stream_dtype(tokenizer.vocab_size).name,
    }
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return None
    try:
        train = load_array(entry / "train.npy")
        val = load_array(entry / "val.npy")
    except (OSError, ValueError):
        return None
    complete = (
        train.shape == (meta.get("train_tokens"),)
        and val.shape == (meta.get("val_tokens"),)
        and train.dtype.name == val.dtype.name == meta["dtype"]
    )
    return (train, val) if complete else None


def _chunks(sizes: Sequence[int], max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of items totalling about ``max_bytes`` each."""
    ranges = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= max_bytes:
            ranges.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _n_bytes(docs: Sequence[Document]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)
