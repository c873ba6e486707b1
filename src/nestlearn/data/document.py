"""The unit of a corpus (:mod:`nestlearn.data.corpus`), whatever its source (files, or a
Hugging Face dataset: :mod:`nestlearn.data.hf`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: the split, the byte cap and the end-of-text tokens work on these."""

    name: str  # stable, relative (a path below the source, or a dataset row id)
    text: str
