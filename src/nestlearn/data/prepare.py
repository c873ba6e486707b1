"""From ``DataConfig`` to memory-mapped token streams, tokenizing each corpus once.

:func:`prepare_data` reads the documents, splits them, gets a tokenizer (the one given, else a BPE
trained on the train split and cached), and returns the train and validation streams: every
document's ids followed by the eos id, concatenated, as read-only memory maps of cached ``.npy``
files. The cache is keyed by the corpus fingerprint (names, texts and split settings) and the
tokenizer fingerprint, so a second call with the same inputs only reads and hashes the corpus and
checks the cached streams against the sha256 sums in their ``meta.json`` (about 1 GB/s). A cached
file whose content does not match is named in a warning and rebuilt; if the rebuilt one does not
match either, :func:`prepare_data` raises a DataError naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nestlearn.config.schema import DataConfig
from nestlearn.data.cache import (
    array_digest,
    cache_root,
    checksum_path,
    load_array,
    load_json,
    save_array,
    save_json,
    status,
    tokenizer_path,
    tokens_dir,
    warn,
)
from nestlearn.data.corpus import corpus_fingerprint, read_documents, split_documents
from nestlearn.data.document import Document
from nestlearn.data.fingerprint import data_fingerprint
from nestlearn.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from nestlearn.errors import DataError
from nestlearn.utils.io import atomic_write_text, sha256_file

# 2: meta.json holds the sha256 of each stream (format-1 entries are rebuilt once).
CACHE_FORMAT = 2
SPLITS = ("train", "val")
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
    # What checkpoints record and resume checks (nestlearn.data.fingerprint.data_fingerprint).
    data_fingerprint: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


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
    ``progress`` shows what a first run spends minutes on (training the BPE, tokenizing) on
    stderr; corrupt cache files are reported (NestlearnWarning) either way.
    """
    docs = read_documents(cfg)
    fingerprint = corpus_fingerprint(docs, cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    root = cache_root(cfg)
    if tokenizer is None:
        tokenizer = _cached_tokenizer(cfg, root, fingerprint, train_docs, progress)
    entry = tokens_dir(root, fingerprint, tokenizer.fingerprint())
    streams, problem = _load_streams(entry, fingerprint, tokenizer)
    if streams is None:
        if problem:
            warn(f"{problem}; rebuilding it")
        _write_streams(entry, fingerprint, tokenizer, train_docs, val_docs, progress)
        streams, problem = _load_streams(entry, fingerprint, tokenizer)
        if streams is None:
            raise DataError(
                f"{problem or f'token cache {entry} cannot be read back'} right after it was "
                "written: check the disk, or point data.cache_dir at another one"
            )
    train, val, digests = streams
    record = data_fingerprint(cfg, docs, fingerprint, tokenizer.fingerprint(), digests)
    return TokenizedCorpus(
        train=train,
        val=val,
        tokenizer=tokenizer,
        train_bytes=_n_bytes(train_docs),
        val_bytes=_n_bytes(val_docs),
        train_docs=len(train_docs),
        val_docs=len(val_docs),
        fingerprint=fingerprint,
        data_fingerprint=record,
    )


def _cached_tokenizer(
    cfg: DataConfig, root: Path, fingerprint: str, train_docs: Sequence[Document], progress: bool
) -> Tokenizer:
    """``cfg.tokenizer``; a BPE is trained once per (corpus, vocab_size, bpe_train_bytes)."""
    if cfg.tokenizer != "bpe":
        return build_tokenizer(cfg, train_docs)
    path = tokenizer_path(root, fingerprint, cfg.vocab_size, cfg.bpe_train_bytes)
    if path.exists():
        tokenizer, problem = _load_cached_tokenizer(path)
        if tokenizer is not None:
            return tokenizer
        # A damaged cache file is not the user's input: say so, retrain and overwrite it.
        warn(f"{problem}; retraining it")
    if progress:
        budget = f"{cfg.bpe_train_bytes / 1e6:.1f} MB" if cfg.bpe_train_bytes > 0 else "all"
        status(
            f"training a {cfg.vocab_size}-token BPE tokenizer on {budget} of the train split "
            f"(once: it is cached in {path.parent})"
        )
    tokenizer = build_tokenizer(cfg, train_docs, progress=progress)
    tokenizer.save(path)
    atomic_write_text(checksum_path(path), sha256_file(path) + "\n")
    return tokenizer


def _load_cached_tokenizer(path: Path) -> tuple[Tokenizer | None, str | None]:
    """(the cached tokenizer, None), or (None, what is wrong with the file).

    A file without a checksum beside it (written before nestlearn kept them) is loaded and its
    checksum recorded.
    """
    sidecar = checksum_path(path)
    try:
        digest = sha256_file(path)
        saved = sidecar.read_text(encoding="utf-8").strip() if sidecar.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cached tokenizer {path} cannot be read ({exc})"
    if saved is not None and saved != digest:
        return None, f"cached tokenizer {path} is corrupt: its sha256 does not match {sidecar.name}"
    try:
        tokenizer = load_tokenizer(path)
    except DataError:
        return None, f"cached tokenizer {path} is corrupt: it does not load as a tokenizer"
    if saved is None:
        atomic_write_text(sidecar, digest + "\n")
    return tokenizer, None


def _write_streams(
    entry: Path,
    fingerprint: str,
    tokenizer: Tokenizer,
    train_docs: Sequence[Document],
    val_docs: Sequence[Document],
    progress: bool,
) -> None:
    """Tokenize both splits into ``entry``; meta.json last, so it marks a complete entry."""
    if progress:
        total = (_n_bytes(train_docs) + _n_bytes(val_docs)) / 1e6
        status(f"tokenizing {total:.1f} MB of text (once: it is cached in {entry})")
    train = prepare_text(train_docs, tokenizer, progress=progress, desc="tokenizing train")
    val = prepare_text(val_docs, tokenizer, progress=progress, desc="tokenizing val")
    save_array(entry / "train.npy", train)
    save_array(entry / "val.npy", val)
    meta = {
        "train_sha256": array_digest(train),
        "val_sha256": array_digest(val),
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


Streams = tuple[np.ndarray, np.ndarray, dict[str, str]]


def _load_streams(
    entry: Path, fingerprint: str, tokenizer: Tokenizer
) -> tuple[Streams | None, str | None]:
    """((train, val, their sha256 by split), None) when the entry is complete and checks out.

    (None, None) is a plain miss (no entry for these inputs, or one of an older cache format);
    (None, problem) names a file whose content is not what its ``meta.json`` says.
    """
    meta = load_json(entry / "meta.json")
    expected = {
        "format": CACHE_FORMAT,
        "corpus_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "dtype": stream_dtype(tokenizer.vocab_size).name,
    }
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return None, None
    arrays = []
    for split in SPLITS:
        path = entry / f"{split}.npy"
        array, problem = _checked_stream(path, meta, split, tokenizer.vocab_size)
        if array is None:
            return None, f"token cache file {path} {problem}"
        arrays.append(array)
    digests = {split: meta[f"{split}_sha256"] for split in SPLITS}
    return (arrays[0], arrays[1], digests), None


def _checked_stream(
    path: Path, meta: dict[str, Any], split: str, vocab_size: int
) -> tuple[np.ndarray | None, str | None]:
    """(the memory map, None) if ``path`` holds what ``meta`` says, else (None, what is wrong)."""
    try:
        array = load_array(path)
    except (OSError, ValueError) as exc:
        return None, f"cannot be read ({exc})"
    n, dtype = meta.get(f"{split}_tokens"), meta["dtype"]
    if array.shape != (n,) or array.dtype.name != dtype:
        return None, (
            f"holds {array.shape} {array.dtype.name} where meta.json says ({n},) {dtype}: it was "
            "truncated or replaced"
        )
    high = int(array.max()) if array.size else 0
    out_of_range = f"its largest id {high} is outside the tokenizer's {vocab_size} ids"
    if array_digest(array) != meta.get(f"{split}_sha256"):
        evidence = f" and {out_of_range}" if high >= vocab_size else ""
        return None, f"is corrupt: its sha256 does not match meta.json{evidence}"
    if high >= vocab_size:
        return None, f"is corrupt: {out_of_range} (though its sha256 matches meta.json)"
    return array, None


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
