"""The on-disk cache of trained tokenizers and token streams.

Layout under the cache root (``data.cache_dir``, else ``$NESTLEARN_CACHE``, else
``~/.cache/nestlearn``)::

    tokenizers/bpe-<corpus>-v<vocab_size>-b<bpe_train_bytes>.json
    tokenizers/bpe-<corpus>-v<vocab_size>-b<bpe_train_bytes>.sha256   its checksum
    tokens/<corpus>-<tokenizer>/{train.npy, val.npy, meta.json}

where ``<corpus>`` and ``<tokenizer>`` are prefixes of the fingerprints. Every file is written
atomically and ``meta.json`` last, so an entry is complete exactly when its meta exists and agrees
with the arrays; anything else is treated as a miss and rebuilt. ``meta.json`` also holds the
sha256 of each array (:func:`array_digest`), checked on every load, and a tokenizer has its
sha256 beside it: a file whose content changed after it was written is reported by name
(:func:`warn`) and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from nestlearn.config.schema import DataConfig
from nestlearn.errors import NestlearnWarning
from nestlearn.utils.io import atomic_write, atomic_write_text

# Fingerprint characters in file names; full fingerprints are checked in meta.json.
KEY_CHARS = 16
# Bytes hashed per hashlib call: a memory map is read block by block, never copied whole.
HASH_BLOCK = 1 << 20


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$NESTLEARN_CACHE``, else ``~/.cache/nestlearn``."""
    root = cfg.cache_dir or os.environ.get("NESTLEARN_CACHE") or "~/.cache/nestlearn"
    return Path(root).expanduser()


def tokenizer_path(root: Path, corpus_fp: str, vocab_size: int, train_bytes: int) -> Path:
    """Where the BPE trained on a corpus's train split with these settings is kept."""
    name = f"bpe-{corpus_fp[:KEY_CHARS]}-v{vocab_size}-b{train_bytes}.json"
    return root / "tokenizers" / name


def checksum_path(path: Path) -> Path:
    """Where the sha256 of a cached file (a tokenizer) is kept: beside it, ``.sha256``."""
    return path.with_suffix(".sha256")


def tokens_dir(root: Path, corpus_fp: str, tokenizer_fp: str) -> Path:
    """The folder of one (corpus, tokenizer) pair's token streams."""
    return root / "tokens" / f"{corpus_fp[:KEY_CHARS]}-{tokenizer_fp[:KEY_CHARS]}"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy``, atomically."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def load_array(path: Path) -> np.ndarray:
    """A read-only memory map of a ``.npy`` file."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def save_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: Path) -> dict | None:
    """The JSON object at ``path``, or None when it is missing or unreadable (a cache miss)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def array_digest(array: np.ndarray) -> str:
    """Hex sha256 of an array's dtype, shape and data (not the ``.npy`` header, whose layout is
    numpy's business). A memory map is hashed in blocks straight from the page cache."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode("ascii"))
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    for start in range(0, len(data), HASH_BLOCK):
        h.update(data[start : start + HASH_BLOCK])
    return h.hexdigest()


def warn(message: str) -> None:
    """Something the user should know that does not stop the run (the CLI prints one line)."""
    warnings.warn(message, NestlearnWarning, stacklevel=3)


def status(message: str) -> None:
    """One progress line on stderr: what a long step is about to do."""
    print(f"nestlearn: {message}", file=sys.stderr, flush=True)
