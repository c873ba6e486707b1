"""The Hugging Face wrapper with padding: generate() of left-padded prompts equals each prompt's
generation alone, and a padded forward's logits equal the unpadded rows' (docs/padding.md)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from nestlearn.hf import to_hf
from nestlearn.models.registry import available_models
from tests.hf.tiny import VOCAB, tiny_model

LENGTHS = (9, 4)
PAD = 0


def left_padded(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - row.shape[1] :], mask[b, T - row.shape[1] :] = row[0], 1
    return rows, ids, mask


@pytest.mark.parametrize("name", available_models())
def test_generate_with_left_padding_equals_each_row_alone(name):
    hf = to_hf(tiny_model(name).double())
    rows, ids, mask = left_padded(0)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for b, row in enumerate(rows):
        alone = hf.generate(row, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert out[b, ids.shape[1] :].tolist() == alone[0, row.shape[1] :].tolist()


@pytest.mark.parametrize("name", ["transformer", "titans_lmm"])
def test_padded_forward_logits_equal_the_unpadded_rows(name):
    hf = to_hf(tiny_model(name).double())
    rows, ids, mask = left_padded(1)
    logits = hf(ids, attention_mask=mask).logits
    for b, row in enumerate(rows):
        n = row.shape[1]
        torch.testing.assert_close(logits[b, -n:], hf(row).logits[0])


@pytest.mark.parametrize("name", ["titans_lmm", "hope"])
@pytest.mark.parametrize("use_cache", [False, True], ids=["aligned", "row-wise"])
def test_hidden_states_of_rearranged_padded_rows_are_those_of_each_row(name, use_cache):
    # no cache: one pass with each row rotated; a cache: one pass per group of equal rows
    hf = to_hf(tiny_model(name).double())
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (4, 7, 4)]
    ids = torch.full((3, 7), PAD, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 7 - row.shape[1] :], mask[b, 7 - row.shape[1] :] = row[0], 1
    out = hf(ids, attention_mask=mask, use_cache=use_cache, output_hidden_states=True)
    for b, row in enumerate(rows):
        alone = hf(row, output_hidden_states=True).hidden_states
        n = row.shape[1]
        for padded, single in zip(out.hidden_states, alone, strict=True):
            torch.testing.assert_close(padded[b, -n:], single[0])
            assert not padded[b, :-n].any()
