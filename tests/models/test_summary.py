"""Parameter counts grouped by component."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nestlearn.models import TransformerConfig, build_model
from nestlearn.models.summary import count_parameters, parameter_table


def model(tie: bool):
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, tie_embeddings=tie)
    return build_model(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_table_sums_to_count(tie):
    m = model(tie)
    table = parameter_table(m)
    names = [name for name, _ in table]
    expected = ["embed", "blocks.*.attn_norm", "blocks.*.attn", "blocks.*.mlp_norm", "blocks.*.mlp"]
    assert names == [*expected, "norm"] + ([] if tie else ["head"])
    assert sum(n for _, n in table) == count_parameters(m)
    assert dict(table)["blocks.*.attn_norm"] == 3 * 16


def test_tied_weights_counted_once():
    assert count_parameters(model(False)) - count_parameters(model(True)) == 50 * 16


def test_trainable_only():
    m = model(True)
    m.embed.weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == count_parameters(m) - 50 * 16


def test_generic_module():
    net = nn.Module()
    net.encoder = nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 3)])
    net.encoder_norm = nn.LayerNorm(3)
    net.scale = nn.Parameter(torch.ones(1))
    # A module's own parameters come before its children's (named_parameters order).
    assert parameter_table(net) == [("scale", 1), ("encoder.*", 9 + 12), ("encoder_norm", 6)]
