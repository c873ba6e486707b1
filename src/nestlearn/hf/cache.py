"""``NestlearnCache``: a nestlearn decoding state as a ``transformers`` :class:`Cache`.

The state is the model's own (SPEC §2.3, recurrent form): the ``dict[str, Tensor]`` of
:meth:`~nestlearn.models.base.LanguageModel.init_state`, a KV cache for the Transformer, memory
weights and short-conv windows for the memory models. ``state["pos"]`` (0-d) counts the positions
read; every other tensor of rank >= 1 has the batch as its first dimension, so beam search
(:meth:`reorder_cache`) and batch expansion/selection act on the rows of every tensor.

A recurrent memory cannot forget its last tokens, so rolling back (:meth:`crop`, which assisted
decoding calls after rejecting draft tokens) is done by *re-reading*: after
:meth:`activate_past_recording` the cache keeps the state at the last rollback point and the
tokens read since; ``crop(-k)`` drops the last ``k`` of those tokens, and the next forward first
re-reads the kept ones from that state (one extra forward over them), then the new tokens. The
result equals a state that never read the dropped tokens, for every model.

Like ``transformers``' own caches, a forward updates the cache it is given in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from nestlearn.models.base import State

# (tokens [B, T], state) -> (logits [B, T, V], state after the tokens), without a padding mask.
Reader = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


def _rows(state: State | None, select: Callable[[torch.Tensor], torch.Tensor]) -> State | None:
    """``select`` applied to every batched tensor (rank >= 1) of ``state``; 0-d ones kept."""
    if state is None:
        return None
    return {key: value if value.ndim == 0 else select(value) for key, value in state.items()}


class NestlearnCache(Cache):
    """A nestlearn decoding state behind ``transformers``' ``Cache`` interface.

    ``NestlearnCache()`` is empty (``generate()`` makes one; the first forward fills it with
    ``init_state``); ``NestlearnCache(state)`` wraps an existing state.
    """

    def __init__(self, state: State | None = None) -> None:
        super().__init__(layers=[])
        if state is not None and "pos" not in state:
            raise ValueError("a nestlearn state has a 'pos' entry; make one with model.init_state")
        self.state: State | None = state
        self.record_past = False
        self._base: State | None = None  # the state at the last rollback point
        self._since: torch.Tensor | None = None  # tokens [B, n] read since _base
        self._replay: torch.Tensor | None = None  # kept tokens to re-read from _base (after crop)

    # ----------------------------------------------------------------- reading tokens
    def begin(
        self,
        tokens: torch.Tensor,
        reread: Reader,
        init_state: Callable[[int, torch.device], State],
    ) -> State:
        """The state to read ``tokens [B, T]`` from: a fresh ``init_state`` for an empty cache;
        after :meth:`crop`, the rollback point's state moved past the kept tokens by
        ``reread`` (the model without a padding mask). Pass the state after ``tokens`` to
        :meth:`advance`."""
        if self._replay is not None:
            replay, self._replay = self._replay, None
            self.state = self._base if replay.shape[1] == 0 else reread(replay, self._base)[1]
            self._base = self._since = None
        elif self.state is None:
            self.state = init_state(tokens.shape[0], tokens.device)
        if self.record_past and self._base is None:
            self._base, self._since = self.state, tokens[:, :0]
        return self.state

    def advance(self, tokens: torch.Tensor, state: State) -> None:
        """``state`` is the state after ``tokens`` (read from :meth:`begin`'s state)."""
        self.state = state
        if self.record_past:
            self._since = torch.cat([self._since, tokens], dim=1)

    # ------------------------------------------------------------- Cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions read (pads included, as ``transformers`` counts them)."""
        if self._replay is not None:
            return int(self._base["pos"]) + self._replay.shape[1]
        return 0 if self.state is None else int(self.state["pos"])

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no cache-imposed bound (the Transformer's max_seq_len is checked itself)

    @property
    def batch_size(self) -> int:
        state = self._base if self.state is None else self.state
        batched = [v for v in (state or {}).values() if v.ndim >= 1]
        return batched[0].shape[0] if batched else -1

    @property
    def is_compileable(self) -> bool:
        return False  # generate() must not auto-compile around a dict of changing tensors

    @property
    def is_croppable(self) -> bool:
        return True  # after activate_past_recording, by re-reading (see the module docstring)

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **_) -> None:
        """Keep what :meth:`crop` needs: the state at the rollback point and the tokens since."""
        self.record_past = True

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return self.record_past

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0  # no per-token states are kept: a rollback re-reads tokens instead

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (a negative count, as in
        ``transformers``); ``crop(0)`` makes the current state the new rollback point."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative count of tokens to remove "
                "(transformers' convention), e.g. crop(-2)"
            )
        k = -tokens_to_remove
        if k == 0:
            if self._replay is None:
                self._base = self._since = None
            return
        if not self.record_past or self._since is None or k > self._since.shape[1]:
            read = 0 if self._since is None else self._since.shape[1]
            raise ValueError(
                f"cannot remove {k} tokens: this cache recorded {read} since its last rollback "
                "point; call activate_past_recording() before reading the tokens to roll back"
            )
        self._replay = self._since[:, : self._since.shape[1] - k]
        self.state, self._since = None, None

    def reset(self) -> None:
        self.state = self._base = self._since = self._replay = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` (beam search), in place."""
        self._select(lambda v: v.index_select(0, beam_idx.to(v.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices``, in place."""
        self._select(lambda v: v[indices.to(v.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (``[a, b] -> [a, a, b, b]``), in place."""
        self._select(lambda v: v.repeat_interleave(repeats, dim=0))

    def _select(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state, self._base = _rows(self.state, select), _rows(self._base, select)
        self._since = None if self._since is None else select(self._since)
        self._replay = None if self._replay is None else select(self._replay)

    def __repr__(self) -> str:
        tensors = len(self.state or self._base or {})
        return f"NestlearnCache(seq_length={self.get_seq_length()}, tensors={tensors})"
