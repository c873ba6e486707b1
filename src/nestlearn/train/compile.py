"""``torch.compile`` for any nestlearn model, applied from outside the model code.

Compilation is in place (:meth:`torch.nn.Module.compile`): the model object, its parameter
names and its ``state_dict`` stay the same, so optimizers, checkpoints and ``init_state`` need no
change. The compiled forward computes the same function as the eager one, up to floating-point
reassociation by the fused kernels (see docs/scale.md for the models that break the graph).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def maybe_compile(
    model: nn.Module,
    enabled: bool,
    mode: str = "default",
    *,
    backend: str = "inductor",
    fullgraph: bool = False,
    dynamic: bool | None = None,
) -> nn.Module:
    """Compile ``model``'s forward in place when ``enabled``; return ``model`` either way.

    ``mode`` is ``torch.compile``'s (``"default"``, ``"reduce-overhead"`` for CUDA graphs,
    ``"max-autotune"``, ...). ``fullgraph=True`` turns any graph break into an error (a check
    that a model compiles to one graph). The first call of each new input shape compiles
    (seconds to minutes); later calls reuse the compiled code.
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    if not enabled:
        return model
    model.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return model


def graph_breaks(model: nn.Module, *args: Any) -> list[str]:
    """Why ``torch.compile`` would split ``model(*args)`` into several graphs (one reason per
    break; empty = one graph). Traces with dynamo only, no code generation."""
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(*args)
    finally:
        torch._dynamo.reset()
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons]
