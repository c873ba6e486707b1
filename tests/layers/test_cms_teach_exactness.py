"""benchmarks/teach_exactness.py: the teach signal against autograd's exact next-token gradient.

The last CMS level of the last block feeds nothing but its position's cross-entropy, so there the
teach signal (the logit lens) is the exact gradient; elsewhere the script measures the gap."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from nestlearn.models.hope import HopeAttentionConfig
from nestlearn.models.hope_titans import HopeConfig
from nestlearn.models.registry import build_model

BENCH = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "teach_exactness.py"))

# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"vocab_size": 13, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16}
CONFIGS = {
    "hope_attention": lambda **kw: HopeAttentionConfig(**SMALL, **kw),
    "hope": lambda **kw: HopeConfig(**SMALL, chunk_size=4, other_chunk_size=2, **kw),
}


@pytest.mark.parametrize(
    ("name", "variant"),
    [("hope_attention", "sequential"), ("hope_attention", "nested"), ("hope", "sequential")],
)
def test_teach_is_exact_for_the_last_level_of_the_last_block_only(name, variant):
    torch.manual_seed(0)
    config = CONFIGS[name](cms_chunk_sizes=[4, 2], cms_lrs=[0.5, 0.5], cms_variant=variant)
    rows = rows_of(config, name)
    assert [(r["block"], r["level"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    last = rows[-1]
    assert last["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert last["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert last["relative_error"] == pytest.approx(0.0, abs=1e-12)
    for row in rows[:-1]:
        assert -1.0 <= row["cosine_min"] <= row["cosine"] <= 1.0
        assert row["relative_error"] > 1e-6  # an approximation there, not the exact gradient


def rows_of(config, name: str) -> list[dict]:
    config.name = name
    model = build_model(config).double()
    if config.cms_variant == "independent":
        with torch.no_grad():
            for block in model.blocks:
                block.cms.agg_logits.copy_(torch.tensor([0.4, -0.3]))
    tokens = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(1))
    return BENCH["teach_exactness"](model, tokens)


def test_independent_levels_are_never_exact():
    """Level l's teach signal reads ``x + a_l y_l``, not the block output ``x + Σ a_j y_j``: in
    the independent variant no level, not even in the last block, gets the exact gradient."""
    torch.manual_seed(0)
    config = CONFIGS["hope_attention"](
        cms_chunk_sizes=[4, 2], cms_lrs=[0.5, 0.5], cms_variant="independent"
    )
    rows = rows_of(config, "hope_attention")
    for row in rows:
        assert -1.0 <= row["cosine_min"] <= row["cosine"] < 1.0 - 1e-9
        assert row["relative_error"] > 1e-6


def test_local_models_are_refused():
    config = HopeAttentionConfig(**SMALL, cms_objective="local")
    config.name = "hope_attention"
    with pytest.raises(ValueError, match="cms_objective must be 'teach'"):
        BENCH["teach_exactness"](build_model(config), torch.zeros(1, 4, dtype=torch.long))
