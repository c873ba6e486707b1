"""The token stream an evaluation of a checkpoint scores: a text source, or the run's held-out
validation split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nestlearn.config.schema import RunConfig
from nestlearn.data import Tokenizer, prepare_data, prepare_text, read_documents


def eval_tokens(
    cfg: RunConfig, tokenizer: Tokenizer, source: str | None = None, progress: bool = False
) -> tuple[np.ndarray, str]:
    """``(tokens, description)``: ``source`` (file, folder, glob, 'stdlib') scored whole, one
    document after another with an end-of-text id after each; without a source, the validation
    split of the run's own corpus."""
    if source:
        docs = read_documents(replace(cfg.data, source=source, max_bytes=0))
        return prepare_text(docs, tokenizer, progress=progress), source
    corpus = prepare_data(cfg.data, tokenizer=tokenizer, progress=progress)
    return np.asarray(corpus.val), f"validation split of {cfg.data.source}"
