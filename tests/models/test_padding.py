"""attention_mask for every model: a padded row gives the logits, state and continuation of the
same row run alone, unpadded (docs/padding.md)."""

from __future__ import annotations

import pytest
import torch

from nestlearn.errors import DataError
from nestlearn.models.padding import row_state, state_counters
from nestlearn.models.registry import available_models
from nestlearn.models.sampling import generate
from tests.hf.tiny import VOCAB, tiny_model

MODELS = pytest.mark.parametrize("name", available_models())
LENGTHS = (13, 6)  # the second row gets 7 pads: chunk boundaries (chunk 4, CMS 16/64) move


def model64(name: str):
    return tiny_model(name).double()


def prompts(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, n), generator=g) for n in LENGTHS]


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens, mask [B, T]``: rows padded on ``side`` with the id 0."""
    T = max(r.shape[1] for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        n = row.shape[1]
        span = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[b, span], mask[b, span] = row[0], 1
    return tokens, mask


def assert_same_state(model, batched: dict, b: int, alone: dict, lead: int) -> None:
    """Row ``b`` of a padded batch's state equals the state of the row run alone."""
    if model.config.name == "transformer":
        # its cache keeps the padded layout: row b's real tokens sit after its lead pads
        n = int(alone["pos"])
        assert int(batched["pos"]) - int(batched["pad"][b]) == n
        for key, value in alone.items():
            if key != "pos":
                torch.testing.assert_close(batched[key][b, :, lead : lead + n], value[0, :, :n])
        return
    pad = batched.get("pad", torch.zeros(len(LENGTHS), dtype=torch.long))
    row = row_state(batched, b, state_counters(model.init_state), pad)
    assert row.keys() == alone.keys()
    for key, value in alone.items():
        torch.testing.assert_close(row[key], value, msg=key)


@MODELS
def test_left_padded_rows_equal_each_row_alone_and_decode_identically(name):
    model = model64(name)
    rows = prompts()
    tokens, mask = padded(rows, "left")
    T = tokens.shape[1]
    with torch.no_grad():
        trained, _ = model(tokens, attention_mask=mask)  # the training form (no state)
        logits, state = model(tokens, model.init_state(2), attention_mask=mask)
        alone = [model(row, model.init_state(1)) for row in rows]
        for b, (row_logits, row_state_) in enumerate(alone):
            n = rows[b].shape[1]
            torch.testing.assert_close(trained[b, T - n :], row_logits[0])
            torch.testing.assert_close(logits[b, T - n :], row_logits[0])
            assert_same_state(model, state, b, row_state_, T - n)
        # greedy decoding continues every row as it would alone
        token = logits[:, -1].argmax(-1)
        singles = [(r[0, -1].argmax(), s) for r, s in alone]
        for _ in range(4):
            assert token.tolist() == [int(t) for t, _ in singles]
            logits, state = model(token[:, None], state)
            stepped = [model(t.view(1, 1), s) for t, s in singles]
            for b, (row_logits, _) in enumerate(stepped):
                torch.testing.assert_close(logits[b, 0], row_logits[0, 0])
            token = logits[:, -1].argmax(-1)
            singles = [(r[0, -1].argmax(), s) for r, s in stepped]


@MODELS
def test_right_padding_leaves_the_real_positions_unchanged(name):
    model = model64(name)
    rows = prompts(1)
    tokens, mask = padded(rows, "right")
    with torch.no_grad():
        unmasked, _ = model(tokens)
        masked, _ = model(tokens, attention_mask=mask)
        for b, row in enumerate(rows):
            n = row.shape[1]
            torch.testing.assert_close(masked[b, :n], unmasked[b, :n], rtol=0, atol=0)
            alone, _ = model(row)
            torch.testing.assert_close(masked[b, :n], alone[0])
        if name == "transformer":
            with pytest.raises(DataError, match="right padding"):
                model(tokens, model.init_state(2), attention_mask=mask)
            return
        # a recurrent state keeps only the real tokens
        _, state = model(tokens, model.init_state(2), attention_mask=mask)
        for b, row in enumerate(rows):
            _, alone_state = model(row, model.init_state(1))
            assert_same_state(model, state, b, alone_state, 0)


@MODELS
def test_no_mask_and_an_all_ones_mask_run_the_same_code(name):
    model = tiny_model(name)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, plain_state = model(tokens, model.init_state(2))
        ones, ones_state = model(
            tokens, model.init_state(2), attention_mask=torch.ones_like(tokens)
        )
    assert torch.equal(plain, ones)
    assert plain_state.keys() == ones_state.keys()
    assert all(torch.equal(plain_state[k], ones_state[k]) for k in plain_state)


@MODELS
def test_a_mask_with_a_hole_is_refused(name):
    model = tiny_model(name)
    tokens = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones_like(tokens)
    mask[1, 3] = 0
    with pytest.raises(DataError, match="row 1 has a hole"):
        model(tokens, attention_mask=mask)
    with pytest.raises(DataError, match="attention_mask must be"):
        model(tokens, attention_mask=mask[:, :-1])


def test_transformer_refuses_pads_after_the_state_holds_tokens():
    model = tiny_model("transformer")
    state = model.init_state(2)
    _, state = model(torch.randint(0, VOCAB, (2, 3)), state)
    tokens = torch.randint(0, VOCAB, (2, 4))
    mask = torch.ones_like(tokens)
    mask[0, 0] = 0
    with pytest.raises(DataError, match="only the start of a sequence"):
        model(tokens, state, attention_mask=mask)


@pytest.mark.parametrize("name", ["transformer", "gated_deltanet", "hope"])
def test_generate_with_left_padded_prompts_equals_each_prompt_alone(name):
    model = model64(name)
    rows = prompts(3)
    tokens, mask = padded(rows, "left")
    batched = torch.stack(list(generate(model, tokens, 5, temperature=0, attention_mask=mask)), 1)
    for b, row in enumerate(rows):
        alone = torch.stack(list(generate(model, row, 5, temperature=0)), 1)
        assert batched[b].tolist() == alone[0].tolist()


BATCHED = ["transformer", "linear_attention", "gla", "deltanet", "gated_deltanet"]


def refuse_row_wise_fallback(monkeypatch) -> None:
    import nestlearn.models.padding as padding

    def refuse(*args, **kwargs):
        raise AssertionError("the row-wise fallback ran")

    monkeypatch.setattr(padding, "forward_rows", refuse)


@MODELS
def test_the_training_form_of_a_padded_batch_is_one_batched_call(name, monkeypatch):
    refuse_row_wise_fallback(monkeypatch)
    model = tiny_model(name)
    tokens, mask = padded(prompts(4), "left")
    with torch.no_grad():
        model(tokens, attention_mask=mask)


@pytest.mark.parametrize("name", BATCHED)
def test_attention_and_matrix_memories_decode_padded_batches_batched(name, monkeypatch):
    refuse_row_wise_fallback(monkeypatch)
    model = tiny_model(name)
    tokens, mask = padded(prompts(4), "left")
    with torch.no_grad():
        logits, state = model(tokens, model.init_state(2), attention_mask=mask)
        model(logits[:, -1].argmax(-1)[:, None], state)


@pytest.mark.parametrize("name", ["titans_lmm", "hope_attention"])
def test_fallback_runs_rows_of_equal_length_together(name, monkeypatch):
    model = model64(name)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 9, 5)]
    tokens, mask = padded(rows, "left")
    calls = []
    unpadded = model.forward_unpadded

    def counted(chunk, state=None):
        calls.append(chunk.shape[0])
        return unpadded(chunk, state)

    monkeypatch.setattr(model, "forward_unpadded", counted)
    with torch.no_grad():
        logits, state = model(tokens, model.init_state(3), attention_mask=mask)
        assert sorted(calls) == [1, 2]  # rows 0 and 2 share a call
        alone = [unpadded(row, model.init_state(1)) for row in rows]
        for _ in range(3):
            for b, (row_logits, _) in enumerate(alone):
                n = row_logits.shape[1]
                torch.testing.assert_close(logits[b, -n:], row_logits[0, -n:])
            token = logits[:, -1].argmax(-1)
            logits, state = model(token[:, None], state)
            alone = [unpadded(token[b].view(1, 1), s) for b, (_, s) in enumerate(alone)]


@pytest.mark.parametrize("name", ["transformer", "gla", "titans_lmm"])
def test_pad_positions_may_hold_any_id(name):
    model = tiny_model(name)
    tokens, mask = padded(prompts(6), "left")
    outside = tokens.masked_fill(mask == 0, VOCAB + 100)  # e.g. a tokenizer's added pad token
    with torch.no_grad():
        expected, _ = model(tokens, model.init_state(2), attention_mask=mask)
        logits, _ = model(outside, model.init_state(2), attention_mask=mask)
    real = mask.bool()
    assert torch.equal(logits[real], expected[real])
