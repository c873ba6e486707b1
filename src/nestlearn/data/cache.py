"""The on-disk cache of trained tokenizers and token streams.

Layout under the cache root (``data.cache_dir``, else ``$NESTLEARN_CACHE``, else
``~/.cache/nestlearn``)::

    tokenizers/bpe-<corpus>-v<vocab_size>-b<bpe_train_bytes>.json
    tokens/<corpus>-<tokenizer>/{train.npy, val.npy, meta.json}

where ``<corpus>`` and ``<tokenizer>`` are prefixes of the fingerprints. Every file is written
atomically and ``meta.json`` last, so an entry is complete exactly when its meta exists and agrees
with the arrays; anything else is treated as a miss and rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nestlearn.config.schema import DataConfig
from nestlearn.utils.io import atomic_write, atomic_write_text

# Fingerprint characters in file names; full fingerprints are checked in meta.json.
KEY_CHARS = 16


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$NESTLEARN_CACHE``, else ``~/.cache/nestlearn``."""
    root = cfg.cache_dir or os.environ.get("NESTLEARN_CACHE") or "~/.cache/nestlearn"
    return Path(root).expanduser()


def tokenizer_path(root: Path, corpus_fp: str, vocab_size: int, train_bytes: int) -> Path:
    """Where the BPE trained on a corpus's train split with these settings is kept."""
    name = f"bpe-{corpus_fp[:KEY_CHARS]}-v{vocab_size}-b{train_bytes}.json"
    return root / "tokenizers" / name


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
