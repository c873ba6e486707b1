"""Documents: reading a corpus, capping it, splitting it by document, fingerprinting it.

A corpus is a list of :class:`~nestlearn.data.document.Document` (a stable name and its exact
text). ``data.source`` picks where the documents come from:

- ``"stdlib"``: the ``.py`` files of this interpreter's standard library (the default corpus, so
  nothing is ever downloaded), without ``site-packages``/``dist-packages``. A folder literally named
  ``stdlib`` must be given as ``./stdlib``.
- a file (one document), a folder (every text file below it, hidden folders skipped) or a glob
  (``*``, ``?`` or ``[`` in the path; the matched files).
- ``"hf"``: a Hugging Face dataset read offline (:mod:`nestlearn.data.hf`).

Files are read as raw bytes and decoded as UTF-8 without newline translation, so a document's
text is exactly the file's content. A file that is not UTF-8 or contains a NUL byte is binary and
skipped; empty documents are dropped (they carry no text, only an end-of-text token).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from nestlearn.config.schema import DataConfig
from nestlearn.data.document import Document
from nestlearn.data.hf import read_hf_documents
from nestlearn.errors import DataError

GLOB_CHARS = ("*", "?", "[")
STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages"})


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that, unlike ``hash()``, is the same in every process."""
    key = "\0".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def read_documents(cfg: DataConfig) -> list[Document]:
    """Read the corpus named by ``cfg.source``, capped at ``cfg.max_bytes`` (0 = all).

    Documents come back sorted by name. With a cap, documents are taken in a fixed pseudo-random
    order (a hash of name and ``split_seed``) until the cap is reached; the one that crosses it
    is cut at its last line break within the cap, so the total never exceeds ``max_bytes``.
    """
    if cfg.source == "hf":
        loaders = [(d.name, partial(str, d.text)) for d in read_hf_documents(cfg)]
    else:
        loaders = [(name, partial(_read_text, path)) for name, path in _list_files(cfg.source)]
    if not loaders:
        raise DataError(
            f"corpus '{cfg.source}' has no documents: point data.source at a file, folder or glob "
            "with text"
        )
    docs, n_text = _load(loaders, cfg.max_bytes, cfg.split_seed)
    if docs:
        return docs
    if n_text:
        raise DataError(
            f"corpus '{cfg.source}' has no text: all {n_text} documents are empty; point "
            "data.source at a file, folder or glob with text"
        )
    raise DataError(
        f"corpus '{cfg.source}' has no UTF-8 text: all {len(loaders)} files are binary or "
        "undecodable; point data.source at a file, folder or glob with text"
    )


def cap_bytes(docs: Sequence[Document], max_bytes: int, seed: int) -> list[Document]:
    """The documents :func:`read_documents` would keep under ``max_bytes`` (0 = all), by name."""
    loaders = [(d.name, partial(str, d.text)) for d in docs]
    return _load(loaders, max_bytes, seed)[0]


def split_documents(
    docs: Sequence[Document], val_fraction: float, split_seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by a stable hash of (split_seed, name).

    A document goes to validation when its hash falls in the lowest ``val_fraction`` of the hash
    range, so adding or removing other files never moves it. Both sides are non-empty: if the hash
    puts no document in val, the one with the smallest hash moves there (and if it puts all of them
    there, the one with the largest hash moves back). A single document is cut in two at the line
    break nearest to ``1 - val_fraction`` of its length, named ``<name>#train`` and ``<name>#val``
    (at a character when it has no usable line break).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} is out of range: use 0 <= x < 1")
    if not docs:
        raise DataError("no documents to split: point data.source at a file, folder or glob")
    if len(docs) == 1:
        return _split_text(docs[0], val_fraction)
    hashes = {d.name: stable_hash("split", split_seed, d.name) for d in docs}
    threshold = val_fraction * 2.0**64
    val_names = {name for name, h in hashes.items() if h < threshold}
    if not val_names:
        val_names = {min(hashes, key=hashes.__getitem__)}
    elif len(val_names) == len(docs):
        val_names.remove(max(hashes, key=hashes.__getitem__))
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return train, val


def corpus_fingerprint(docs: Sequence[Document], cfg: DataConfig) -> str:
    """Hex sha256 of every name and text plus the split settings: the key of all cached work."""
    h = hashlib.sha256()
    settings = {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "format": 1}
    h.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for doc in docs:
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        for field in (doc.name.encode("utf-8"), doc.text.encode("utf-8")):
            h.update(len(field).to_bytes(8, "big"))
            h.update(field)
    return h.hexdigest()


def _load(
    loaders: Sequence[tuple[str, Callable[[], str | None]]], max_bytes: int, seed: int
) -> tuple[list[Document], int]:
    """Read documents (all, or in hashed order up to ``max_bytes``); also count the text ones.

    Reading lazily means a small cap on a big folder reads only the files it keeps.
    """
    if max_bytes > 0:
        loaders = sorted(loaders, key=lambda item: stable_hash("order", seed, item[0]))
    budget = max_bytes
    kept: list[Document] = []
    n_text = 0
    for name, load in loaders:
        text = load()
        if text is None:
            continue
        n_text += 1
        if not text:
            continue
        if max_bytes > 0:
            size = len(text.encode("utf-8"))
            if size > budget:
                text = _cut_to_bytes(text, budget)
                if text:
                    kept.append(Document(name, text))
                break
            budget -= size
        kept.append(Document(name, text))
    kept.sort(key=lambda d: d.name)
    return kept, n_text


def _cut_to_bytes(text: str, budget: int) -> str:
    """The longest prefix of whole lines of ``text`` within ``budget`` UTF-8 bytes.

    Without a line break in the budget, the longest prefix of whole characters.
    """
    head = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    newline = head.rfind("\n")
    return head[: newline + 1] if newline >= 0 else head


def _split_text(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Cut one document in two near ``1 - val_fraction`` of its length, at a line break if any."""
    n = len(doc.text)
    if n < 2:
        raise DataError(
            f"corpus has one document '{doc.name}' of {n} character(s), too little to hold out "
            "validation text: add text or documents"
        )
    target = round((1.0 - val_fraction) * n)
    # Cut points just after a newline, strictly inside the text so both sides are non-empty.
    before = doc.text.rfind("\n", 0, target) + 1
    after = doc.text.find("\n", target) + 1
    cuts = [c for c in (before, after) if 0 < c < n]
    cut = min(cuts, key=lambda c: abs(c - target)) if cuts else min(max(target, 1), n - 1)
    train = Document(f"{doc.name}#train", doc.text[:cut])
    val = Document(f"{doc.name}#val", doc.text[cut:])
    return [train], [val]


def _read_text(path: Path) -> str | None:
    """The file's exact text, or None when it is binary (a NUL byte) or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read {path} ({exc.strerror}): fix its permissions or leave it out of "
            "data.source"
        ) from None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _list_files(source: str) -> list[tuple[str, Path]]:
    """(name, path) of every candidate file of a non-hf source, sorted by name."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, skip=STDLIB_EXCLUDED)
        return [(name, path) for name, path in files if name.endswith(".py")]
    if any(c in source for c in GLOB_CHARS):
        return _glob(source)
    path = Path(source).expanduser()
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        return _walk(path, skip=frozenset())
    raise DataError(
        f"data source '{source}' does not exist: point data.source at an existing file, folder "
        "or glob, or use 'stdlib' or 'hf'"
    )


def _walk(root: Path, skip: frozenset[str]) -> list[tuple[str, Path]]:
    """Files below ``root``, named by relative POSIX path; hidden and ``skip`` folders pruned."""
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in skip]
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _glob(pattern: str) -> list[tuple[str, Path]]:
    """Files matching ``pattern`` (``**`` recurses), named relative to its literal head."""
    pattern = os.path.expanduser(pattern)
    parts = Path(pattern).parts
    literal = []
    for part in parts:
        if any(c in part for c in GLOB_CHARS):
            break
        literal.append(part)
    base = Path(*literal) if literal else Path(".")
    matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
    found = sorted((p.relative_to(base).as_posix(), p) for p in matches if p.is_file())
    if not found:
        raise DataError(
            f"data source '{pattern}' matched no files: fix the glob or point data.source at an "
            "existing file or folder"
        )
    return found
