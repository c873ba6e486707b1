"""Tiny models of every registered architecture, for tests that run them all.

Also used by tests/train (compile, activation checkpointing). A model added to the registry is
covered automatically; ``SMALL`` sets the fields an architecture has to small values.
"""

from __future__ import annotations

import dataclasses

import torch

from nestlearn.config.loader import build_section
from nestlearn.models.base import LanguageModel
from nestlearn.models.registry import build_model, model_config_class

VOCAB = 37
# Chunks and windows shorter than the test inputs, so their boundaries are crossed.
SMALL = {"n_heads": 2, "chunk_size": 4, "window": 8}


def tiny_model(name: str, **fields) -> LanguageModel:
    """Architecture ``name`` at d_model 16, 2 layers, vocabulary 37; seeded, eval mode."""
    cls = model_config_class(name)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {"name": name, "vocab_size": VOCAB, "d_model": 16, "n_layers": 2, "max_seq_len": 64}
    values.update({k: v for k, v in SMALL.items() if k in names}, **fields)
    torch.manual_seed(0)
    return build_model(build_section("model", cls, values)).eval()
