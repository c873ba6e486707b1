"""train_batch is a pure function of its arguments; eval_batches covers the stream once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestlearn.data import eval_batches, train_batch
from nestlearn.errors import DataError

STREAM = np.arange(1000, dtype=np.uint16)


def batch(**overrides):
    args = {"step": 3, "micro_step": 0, "batch_size": 8, "seq_len": 16, "seed": 0, "rank": 0}
    return train_batch(STREAM, **{**args, **overrides})


def test_train_batch_shapes_shift_and_bounds():
    x, y = batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    # The stream counts up, so a contiguous window shifted by one is exactly x + 1.
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.min() >= 0 and y.max() <= len(STREAM) - 1


def test_train_batch_is_a_pure_function_of_its_arguments():
    x, y = batch()
    again_x, again_y = batch()
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    for change in ({"step": 4}, {"micro_step": 1}, {"seed": 1}, {"rank": 1}):
        assert not torch.equal(batch(**change)[0], x), change


def test_train_batch_reaches_both_ends():
    starts = torch.cat([batch(step=s, seq_len=4)[0][:, 0] for s in range(1000)])
    assert starts.min() == 0 and starts.max() == len(STREAM) - 5


def test_train_batch_on_a_minimal_stream():
    tokens = np.arange(17, dtype=np.uint16)
    x, y = train_batch(tokens, step=0, micro_step=0, batch_size=2, seq_len=16, seed=0)
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


def test_train_batch_too_short_stream_names_the_fix():
    with pytest.raises(DataError, match=r"more data or a lower train\.seq_len"):
        train_batch(np.arange(16), step=0, micro_step=0, batch_size=2, seq_len=16, seed=0)


def test_eval_batches_cover_consecutive_windows():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches]).ravel()
    ys = torch.cat([y for _, y in batches]).ravel()
    assert torch.equal(xs, torch.arange(100)) and torch.equal(ys, torch.arange(1, 101))
    again = list(eval_batches(tokens, batch_size=4, seq_len=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize(
    ("n", "seq_len", "max_tokens", "targets", "window"),
    [
        (103, 10, 35, 30, 10),  # capped to whole windows
        (103, 10, 5, 5, 5),  # a cap below seq_len shortens the window
        (5, 10, 0, 4, 4),  # a short stream gives one shorter window
        (2, 10, 0, 1, 1),
        (103, 10, 0, 100, 10),
    ],
)
def test_eval_batches_caps_and_short_streams(n, seq_len, max_tokens, targets, window):
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=seq_len, max_tokens=max_tokens))
    assert sum(y.numel() for _, y in batches) == targets
    assert all(x.shape[1] == window for x, _ in batches)
    assert torch.equal(batches[0][0][0, 0], torch.tensor(0))


def test_a_capped_eval_spreads_its_windows_over_the_stream():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=2, seq_len=10, max_tokens=30))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [0, 500, 990]  # windows 0, 50 and 99 of 100


def test_eval_batches_needs_two_tokens():
    with pytest.raises(DataError, match="too few"):
        list(eval_batches(np.arange(1), batch_size=1, seq_len=4))
