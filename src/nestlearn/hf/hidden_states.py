"""Hidden states per block for ``output_hidden_states=True``, read with forward hooks.

Every nestlearn language model has ``embed``, ``blocks`` (each block's first argument and first
output is the residual stream ``[B, T, d_model]``) and a final ``norm``. As in ``transformers``'
own models (Llama: one state per decoder layer's input, the last after the final norm), the
tuple holds ``n_layers + 1`` tensors ``[B, T, d_model]``: the input of block 1, the output of
blocks 1 .. n-1, and ``norm(output of block n)``, the stream the head reads.

The models themselves are not changed: hooks on the blocks record each pass through them. A
padded batch that a model runs on rearranged rows (the aligned form or the row-wise fallback of
:mod:`nestlearn.models.padding`) records how (:func:`~nestlearn.models.padding.
recording_passes`); its rows are put back at their real positions, pad positions are zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from nestlearn.models.base import LanguageModel
from nestlearn.models.padding import Pass, place_passes, recording_passes


class Passes(list):
    """Per pass through the blocks: ``[input of block 1, outputs...]``; ``layout``: how a padded
    call rearranged its rows for them (empty: each pass holds the batch as given)."""

    layout: list[Pass]


@contextlib.contextmanager
def recording_blocks(model: LanguageModel) -> Iterator[Passes]:
    """Record the residual stream at every block boundary while the context is open."""
    passes = Passes()

    def before_first(module: torch.nn.Module, args: tuple) -> None:
        passes.append([args[0]])

    def after(module: torch.nn.Module, args: tuple, output) -> None:
        passes[-1].append(output[0] if isinstance(output, tuple) else output)

    handles = [model.blocks[0].register_forward_pre_hook(before_first)]
    handles += [block.register_forward_hook(after) for block in model.blocks]
    try:
        with recording_passes() as layout:
            passes.layout = layout
            yield passes
    finally:
        for handle in handles:
            handle.remove()


def hidden_states(
    model: LanguageModel,
    passes: Passes,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """The ``n_layers + 1`` hidden states ``[B, T, d_model]`` of one forward over ``tokens``
    from its recorded ``passes`` (see the module docstring)."""
    layout = getattr(passes, "layout", None)
    if layout:
        B, T = tokens.shape
        states = [place_passes(layout, [p[i] for p in passes], B, T) for i in range(len(passes[0]))]
    elif len(passes) == 1 and passes[0][0].shape[:2] == tokens.shape:
        states = list(passes[0])
    else:
        raise RuntimeError(
            f"hidden states: {len(passes)} passes through the blocks and no padding layout; "
            "this model's forward runs its blocks in a way output_hidden_states does not know"
        )
    states[-1] = model.norm(states[-1])
    return tuple(states)
