"""What a run's data was, recorded in every checkpoint and checked when the run resumes.

Exact resume needs the same token streams, not only the same config: a file of ``data.source``
edited between a kill and ``--resume``, or a Python upgrade under ``data.source=stdlib``, would
otherwise continue the run on other data without a word. :func:`data_fingerprint` records

- ``corpus``: the corpus fingerprint (every document's name and text, and the split settings);
- ``tokenizer``: the tokenizer fingerprint (sha256 of its JSON);
- ``train_tokens``, ``val_tokens``: the sha256 of the token streams the run reads (these also
  change if the same text and tokenizer tokenize differently, e.g. after a library upgrade);
- ``documents``: a short hash of each document by name (up to :data:`MAX_LISTED_DOCUMENTS`), so
  a refusal can name the files that changed; ``python``: the interpreter version for ``stdlib``.

:func:`check_resume_data` compares a checkpoint's record with the data found at resume: equal
passes, different raises a one-line :class:`DataError` naming what changed unless the user
allowed it (``nestlearn train --resume RUN --allow-data-change``), and a checkpoint without a
record (written before nestlearn kept one) resumes with a warning that the data could not be
checked.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nestlearn.config.schema import DataConfig
from nestlearn.data.cache import warn
from nestlearn.data.document import Document
from nestlearn.errors import DataError

FINGERPRINT_VERSION = 1
# Beyond this many documents only the totals are recorded (a checkpoint stays small).
MAX_LISTED_DOCUMENTS = 20_000
# Hex characters of each document's hash: enough to tell an edit, small in a checkpoint.
DOCUMENT_HASH_CHARS = 16
# Components whose equality means "the run reads the same data".
COMPARED = ("corpus", "tokenizer", "train_tokens", "val_tokens")
# Files named in a refusal before "and N more".
NAMED_FILES = 3


def data_fingerprint(
    cfg: DataConfig,
    docs: Sequence[Document],
    corpus_fp: str,
    tokenizer_fp: str,
    stream_digests: dict[str, str],
) -> dict[str, Any]:
    """The record a checkpoint keeps of its data (plain strings and ints only)."""
    record: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "source": f"hf:{cfg.hf_dataset}" if cfg.source == "hf" else cfg.source,
        "corpus": corpus_fp,
        "tokenizer": tokenizer_fp,
        "train_tokens": stream_digests["train"],
        "val_tokens": stream_digests["val"],
        "n_documents": len(docs),
    }
    if cfg.source == "stdlib":
        record["python"] = platform.python_version()
    if len(docs) <= MAX_LISTED_DOCUMENTS:
        record["documents"] = {
            d.name: hashlib.sha256(d.text.encode("utf-8")).hexdigest()[:DOCUMENT_HASH_CHARS]
            for d in docs
        }
    return record


def describe_data_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two :func:`data_fingerprint` records, in words; None if nothing."""
    if all(saved.get(key) == current.get(key) for key in COMPARED):
        return None
    changes = []
    if saved.get("corpus") != current.get("corpus"):
        changes.append(_corpus_change(saved, current))
    if saved.get("tokenizer") != current.get("tokenizer"):
        changes.append("the tokenizer changed")
    if not changes:
        changes.append(
            "the token streams changed though the corpus text and tokenizer did not (a different "
            "`tokenizers` or nestlearn version tokenizes differently)"
        )
    return "; ".join(changes)


def check_resume_data(
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    checkpoint: Path,
    *,
    allow_change: bool = False,
    report: bool = True,
    step: int | None = None,
) -> None:
    """Refuse to resume ``checkpoint`` on data other than what it was trained on.

    ``saved`` is the checkpoint's record (None for checkpoints written before records existed:
    resumed with a warning, unless the checkpoint is at ``step`` 0 and so has read no data, like
    a ``nestlearn convert`` run). With ``allow_change`` a difference is reported and accepted.
    Warnings are issued when ``report`` (rank 0 of a data-parallel run); errors on every rank.
    """
    if not saved:
        if report and step != 0:
            warn(
                f"{checkpoint} records no data fingerprint (written by an older nestlearn); "
                "the data could not be checked against the run's"
            )
        return
    change = describe_data_change(saved, current)
    if change is None:
        return
    if allow_change:
        if report:
            warn(f"resuming on changed data (--allow-data-change): {change}")
        return
    raise DataError(
        f"the data differs from what {checkpoint} was trained on: {change}; restore it, start a "
        "new run (train.out_dir=...), or resume with --allow-data-change to continue on the new "
        "data (the resume is then not exact)"
    )


def _corpus_change(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Which corpus changed and, where both records list documents, which documents."""
    source = current.get("source", "?")
    if source == "stdlib":
        what = "the Python standard library (data.source=stdlib)"
        old, new = saved.get("python"), current.get("python")
        if old and new and old != new:
            what += f", Python {old} then, {new} now,"
    else:
        what = f"the corpus of data.source={source}"
    before, after = saved.get("documents"), current.get("documents")
    if not isinstance(before, dict) or not isinstance(after, dict):
        counts = f"{saved.get('n_documents', '?')} documents then, {current.get('n_documents')} now"
        return f"{what} changed ({counts})"
    common = sorted(before.keys() & after.keys())
    changed = [f"{n} (edited)" for n in common if before[n] != after[n]]
    changed += [f"{n} (added)" for n in sorted(after.keys() - before.keys())]
    changed += [f"{n} (removed)" for n in sorted(before.keys() - after.keys())]
    if not changed:
        return f"{what} changed"
    more = len(changed) - NAMED_FILES
    listed = ", ".join(changed[:NAMED_FILES]) + (f" and {more} more" if more > 0 else "")
    return f"{what} changed: {listed}"
