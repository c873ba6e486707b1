from __future__ import annotations

from nestlearn.levels import LEVEL_HEADERS, Level, levels_rows, model_levels
from nestlearn.models.registry import build_model
from nestlearn.models.transformer import TransformerConfig


def test_transformer_levels_list_attention_then_the_outer_level():
    model = build_model(TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2))
    levels = model.levels("adamw")
    assert [lv.component for lv in levels] == ["blocks.0.attn", "blocks.1.attn", "(all parameters)"]
    assert levels[0].update_every == 1 and levels[-1].update_every is None
    rows = levels_rows(levels)
    # Table rows: slowest first, level 1 the outer level.
    assert [(r[0], r[1]) for r in rows] == [
        ("1", "(all parameters)"),
        ("2", "blocks.0.attn"),
        ("2", "blocks.1.attn"),
    ]
    assert len(rows[0]) == len(LEVEL_HEADERS)
    assert levels[-1].optimizer == "adamw"


def test_levels_are_ordered_fastest_first():
    import torch

    class Slow(torch.nn.Module):
        def inner_levels(self):
            return [Level("", "m", "l2", "gd", 64)]

    class Fast(torch.nn.Module):
        def inner_levels(self):
            return [Level("inner", "m", "l2", "gd", 1)]

    model = torch.nn.Sequential(Slow(), Fast())
    levels = model_levels(model)
    assert [lv.component for lv in levels] == ["1.inner", "0", "(all parameters)"]
    assert [lv.frequency for lv in levels] == ["1 / token", "1 / 64 tokens", "1 / optimizer step"]
