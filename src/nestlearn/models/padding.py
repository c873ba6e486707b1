"""Padded batches: ``attention_mask [B, T]`` (1 = real token, 0 = padding) for every model.

A row's real tokens must be one contiguous run: zeros before it are *left* padding, zeros after it
*right* padding; a hole (a zero between two real tokens) is refused. The contract
(``docs/padding.md``): each row's logits at its real positions, and the state after it, equal
those of the row's real tokens run alone, unpadded; logits at pad positions are unspecified
(finite).

* Right padding without a state changes nothing: a causal model's outputs at the real positions
  never read the later pads, so the mask is not even needed.
* The Transformer masks pad keys and counts RoPE positions from each row's first real token, in
  one batched call (:mod:`nestlearn.layers.attention`); the matrix memories zero a pad's write and
  decay (:mod:`nestlearn.layers.matrix_memory`).
* Without a state (the training form, scoring), every other model runs the batch in one call with
  each row's real tokens rotated to start at position 0 (:func:`forward_aligned`).
* With a state, every other model runs the *row-wise fallback* (:func:`forward_rows`): each row's
  real tokens alone, from its slice of the state. Chunked memories (Titans, HOPE's self-modifying
  Titans and CMS levels) take steps whose result depends on where chunk boundaries fall, and
  their states hold chunk counters shared by the batch; running the real tokens alone keeps every
  boundary where the unpadded row has it. It costs one forward per group of rows with as many
  real tokens instead of one of batch ``B``.

State bookkeeping for padded streams: ``state["pos"]`` (0-d) keeps counting every position fed,
pads included (as ``transformers`` expects of a cache's length); ``state["pad"]`` (``[B]`` long,
present once a padded call happened) counts each row's pad positions, so row ``b`` has seen
``pos - pad[b]`` real tokens. A counter the model keeps inside its state (0-d in
``init_state``) becomes ``[B]`` when the rows' counters differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch

from nestlearn.errors import DataError
from nestlearn.models.base import State

PAD_KEY = "pad"


class Padding(NamedTuple):
    """Where each row's real tokens lie in a call: ``lead [B]`` pads before, ``real [B]`` real
    tokens, then ``T - lead - real`` pads after (all long tensors)."""

    lead: torch.Tensor
    real: torch.Tensor

    def has_left(self) -> bool:
        return bool(self.lead.any())

    def has_right(self, T: int) -> bool:
        return bool((self.lead + self.real < T).any())


def padding_of(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> Padding | None:
    """Validate ``attention_mask`` against ``tokens [B, T]``; ``None`` when there is no padding
    (no mask, or all ones). A :class:`DataError` names a wrong shape, values other than 0/1 and
    rows whose real tokens are not contiguous."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise DataError(
            f"attention_mask must be [batch, seq_len] = {tuple(tokens.shape)} like the tokens, "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=tokens.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.bool()
    if bool(mask.all()):
        return None
    T = tokens.shape[1]
    real = mask.sum(1)  # [B]
    # index of the first real token (T for an empty row)
    first = torch.where(mask.any(1), mask.int().argmax(1), torch.full_like(real, T))
    index = torch.arange(T, device=mask.device)
    run = (index >= first[:, None]) & (index < (first + real)[:, None])
    if not bool((run == mask).all()):
        row = int((run != mask).any(1).nonzero()[0])
        raise DataError(
            f"attention_mask row {row} has a hole (a 0 between two real tokens): only left "
            "padding (zeros before the tokens) and right padding (zeros after) are supported; "
            "pack each sequence's tokens together"
        )
    return Padding(first.long(), real.long())


def zero_pads(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` with id 0 at pad positions, so any pad id (even one outside the vocabulary) is
    accepted; ``tokens`` itself without a mask (or one of another shape: refused later)."""
    if attention_mask is None or tuple(attention_mask.shape) != tuple(tokens.shape):
        return tokens
    return tokens.masked_fill(attention_mask.to(tokens.device) == 0, 0)


class Pass(NamedTuple):
    """One pass of a padded call through the model's blocks, on rearranged rows: its tensors
    ``[len(rows), n, ...]`` hold batch row ``rows[i]``, whose position ``j < real[i]`` is the
    call's position ``(starts[i] + j) % T`` (``j >= real[i]``: pads)."""

    rows: list[int]
    starts: list[int]
    real: list[int]


_PASSES: ContextVar[list[Pass] | None] = ContextVar("nestlearn_padding_passes", default=None)


@contextlib.contextmanager
def recording_passes() -> Iterator[list[Pass]]:
    """While open, every padded forward that runs its blocks on rearranged rows (the aligned form,
    the row-wise fallback) appends one :class:`Pass` per pass, in order; batched forms append
    nothing (their passes hold the batch as given). For readers of per-block activations."""
    layout: list[Pass] = []
    token = _PASSES.set(layout)
    try:
        yield layout
    finally:
        _PASSES.reset(token)


def _record(rows: list[int], starts: list[int], real: list[int]) -> None:
    layout = _PASSES.get()
    if layout is not None:
        layout.append(Pass(rows, starts, real))


def place_passes(layout: list[Pass], values: list[torch.Tensor], B: int, T: int) -> torch.Tensor:
    """Per-pass tensors ``[G, n, ...]`` (one per :class:`Pass` of ``layout``) put back at their
    rows' real positions of a ``[B, T, ...]`` batch; pad positions are 0."""
    out = values[0].new_zeros(B, T, *values[0].shape[2:])
    for p, value in zip(layout, values, strict=True):
        for i, b in enumerate(p.rows):
            j = torch.arange(p.real[i], device=value.device)
            out[b, (p.starts[i] + j) % T] = value[i, : p.real[i]]
    return out


def state_pad(state: State | None, batch_size: int) -> torch.Tensor | None:
    """``state["pad"]`` (pad positions per row so far), or None for an unpadded state."""
    if state is None or PAD_KEY not in state:
        return None
    pad = state[PAD_KEY]
    if pad.shape != (batch_size,):
        raise DataError(
            f"state['pad'] has shape {tuple(pad.shape)}, expected [{batch_size}]: a state of "
            "another batch size"
        )
    return pad


def row_state(state: State, b: int, counters: set[str], pad: torch.Tensor) -> State:
    """Row ``b`` of a batched state, as the state of a batch of one: counters (0-d in
    ``init_state``) are taken per row, ``pos`` counts the row's real tokens only, every other
    entry is a ``[1, ...]`` view (in-place writes reach the batched tensor)."""
    out: State = {}
    for key, value in state.items():
        if key == PAD_KEY:
            continue
        if key == "pos":
            out[key] = value - pad[b]
        elif key in counters:
            out[key] = value[b] if value.ndim == 1 else value
        else:
            out[key] = value[b : b + 1]
    return out


def group_state(state: State, rows: list[int], counters: set[str], pad: torch.Tensor) -> State:
    """Rows ``rows`` of a batched state (copies), as one state: they must share every counter
    and their count of real tokens (``pos`` counts those only)."""
    index = torch.tensor(rows, device=pad.device)
    out: State = {}
    for key, value in state.items():
        if key == PAD_KEY:
            continue
        if key == "pos":
            out[key] = value - pad[rows[0]]
        elif key in counters:
            out[key] = value[rows[0]] if value.ndim == 1 else value
        else:
            out[key] = value.index_select(0, index)
    return out


Forward = Callable[[torch.Tensor, State | None], tuple[torch.Tensor, State | None]]


def forward_rows(
    forward: Forward,
    tokens: torch.Tensor,
    state: State | None,
    padding: Padding | None,
    counters: set[str],
    vocab_size: int,
) -> tuple[torch.Tensor, State | None]:
    """The row-wise fallback: ``forward`` (a model's unpadded forward) on each row's real tokens
    alone, from the row's slice of ``state``; logits at pad positions are 0.

    Rows with as many real tokens and equal counters (so equal chunk boundaries) run together as
    one batch. ``padding=None``: every token is real (a decoding step after a padded prefill).
    """
    B, T = tokens.shape
    if padding is None:
        full = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        padding = Padding(torch.zeros_like(full), full)
    pad = state_pad(state, B)
    if state is not None and pad is None:
        pad = torch.zeros(B, dtype=torch.long, device=tokens.device)
    lead, real = padding.lead.tolist(), padding.real.tolist()
    names = sorted(counters - {"pos"}) if state is not None else []
    per_row = [state[k].tolist() if state[k].ndim else [int(state[k])] * B for k in names]
    seen = (state["pos"] - pad).tolist() if state is not None else [0] * B
    groups: dict[tuple, list[int]] = {}
    for b in range(B):
        groups.setdefault((real[b], seen[b], *(c[b] for c in per_row)), []).append(b)

    logits: torch.Tensor | None = None
    new: State = {}
    if state is not None:
        new = {k: v.clone() for k, v in state.items() if k not in counters and k != PAD_KEY}
        new.update(
            {k: torch.tensor(c, device=tokens.device) for k, c in zip(names, per_row, strict=True)}
        )
    for (n, *_), rows in groups.items():
        if n == 0:  # padding only: nothing changes
            continue
        chunk = torch.stack([tokens[b, lead[b] : lead[b] + n] for b in rows])  # [G, n]
        sub = None if state is None else group_state(state, rows, counters, pad)
        _record(rows, [lead[b] for b in rows], [n] * len(rows))
        group_logits, sub = forward(chunk, sub)
        if logits is None:
            logits = group_logits.new_zeros(B, T, group_logits.shape[-1])
        for i, b in enumerate(rows):
            logits[b, lead[b] : lead[b] + n] = group_logits[i]
        if sub is not None:
            index = torch.tensor(rows, device=tokens.device)
            for key, value in sub.items():
                if key in new and key not in counters:
                    new[key].index_copy_(0, index, value.to(new[key].dtype))
                elif key in names:
                    new[key][index] = value
    if logits is None:  # every row is padding only
        logits = torch.zeros(B, T, vocab_size, device=tokens.device)
    if state is None:
        return logits, None
    for key in names:  # a counter equal in every row stays 0-d
        if bool((new[key] == new[key][0]).all()):
            new[key] = new[key][0].clone()
    new["pos"] = state["pos"] + T
    new_pad = pad + (T - padding.real)
    if bool(new_pad.any()) or any(new[k].ndim == 1 for k in names):
        new[PAD_KEY] = new_pad
    return logits, new


def forward_aligned(
    forward: Forward, tokens: torch.Tensor, padding: Padding
) -> tuple[torch.Tensor, None]:
    """The training form (no state) of a padded batch in one call: each row is rotated so its
    real tokens start at position 0 (its left pads move to its end, as right padding), run
    batched, and the logits rotated back. A causal model's outputs at the real positions never
    read the pads after them, and every chunk boundary sits where the unpadded row has it."""
    B, T = tokens.shape
    index = torch.arange(T, device=tokens.device)
    aligned = tokens.gather(1, (index[None] + padding.lead[:, None]) % T)
    _record(list(range(B)), padding.lead.tolist(), padding.real.tolist())
    logits, _ = forward(aligned, None)
    back = ((index[None] - padding.lead[:, None]) % T)[..., None].expand(-1, -1, logits.shape[-1])
    real = (index[None] >= padding.lead[:, None]) & (
        index[None] < (padding.lead + padding.real)[:, None]
    )
    return logits.gather(1, back).masked_fill(~real[..., None], 0.0), None


def state_counters(init_state: Callable[..., State]) -> set[str]:
    """Keys of a model's state that are 0-d counters shared by the batch (``pos`` included)."""
    return {k for k, v in init_state(1, device="meta").items() if v.ndim == 0}


def forward_padded(
    model: torch.nn.Module,
    forward: Forward,
    tokens: torch.Tensor,
    state: State | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, State | None]:
    """A model's forward with an optional mask: ``forward`` itself (same code, same numbers)
    without padding or with right padding only and no state; without a state
    :func:`forward_aligned`, with one :func:`forward_rows`."""
    padding = padding_of(attention_mask, tokens)
    pad = state_pad(state, tokens.shape[0])
    if padding is None and pad is None:
        return forward(tokens, state)
    tokens = zero_pads(tokens, attention_mask)
    if state is None and not padding.has_left():
        return forward(tokens, None)
    if state is None:
        return forward_aligned(forward, tokens, padding)
    counters = model.__dict__.get("_padding_counters")
    if counters is None:
        counters = state_counters(model.init_state)
        model.__dict__["_padding_counters"] = counters
    return forward_rows(forward, tokens, state, padding, counters, model.config.vocab_size)
