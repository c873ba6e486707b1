"""One optimizer made of several: matrices to a matrix rule, the rest to AdamW (as Muon users do).

:func:`split_parameters` sends every trainable parameter of rank ≥ 2 to the matrix side except
embedding tables and the output head (``model.head`` / ``model.lm_head``, tied or not): their
rows are per-token lookups, not linear maps of a hidden state, and Muon-style updates are not
meant for them. Everything else (embeddings, head, norm gains, biases) goes to AdamW, with
weight decay on the rank ≥ 2 ones only (the rule of :func:`nestlearn.train.optim.parameter_groups`).

:class:`HybridOptimizer` behaves like one ``torch.optim.Optimizer``: ``step(closure)`` evaluates
the closure once and steps every part, ``zero_grad`` clears all, ``param_groups`` is the
concatenation of the parts' groups (the same dicts, so an LR scheduler's changes reach the parts)
and ``state_dict()`` nests the parts' state dicts by name (tensors and plain values only, loadable
with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

HEAD_NAMES = ("head", "lm_head")


class HybridOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, stepped as one (module docstring)."""

    def __init__(self, parts: dict[str, Optimizer]) -> None:
        if not parts:
            raise ValueError("HybridOptimizer needs at least one part (name -> optimizer)")
        seen: set[int] = set()
        for name, part in parts.items():
            if not isinstance(part, Optimizer):
                raise ValueError(f"part '{name}' is not a torch.optim.Optimizer: {part!r}")
            for group in part.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            f"a parameter of shape {list(p.shape)} is in two parts; "
                            "each parameter must belong to exactly one optimizer"
                        )
                    seen.add(id(p))
        self.parts = dict(parts)
        params = [p for part in parts.values() for g in part.param_groups for p in g["params"]]
        self._building = True
        super().__init__(params, {})
        self._building = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The parts' groups, read afresh (a part's ``load_state_dict`` replaces its dicts)."""
        return [g for part in self.parts.values() for g in part.param_groups]

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        # Optimizer.__init__ assigns its own list while building; the parts own the groups.
        pass

    @property
    def state(self) -> ChainMap:
        """A read-only view of the parts' per-parameter states."""
        return ChainMap(*(part.state for part in self.parts.values()))

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_building", False):
            return
        raise NotImplementedError(
            "add a parameter group to one of HybridOptimizer.parts (then rebuild the hybrid)"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("parts") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(self.parts):
            found = sorted(saved) if isinstance(saved, dict) else type(state_dict).__name__
            raise ValueError(
                f"HybridOptimizer state has parts {found}, this optimizer has "
                f"{sorted(self.parts)}; load a state saved by the same optimizer configuration"
            )
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])


def split_parameters(
    model: nn.Module, exclude: Iterable[torch.Tensor] = ()
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(matrices, others)`` of the trainable parameters, each listed once (module docstring).

    ``exclude``: further parameters to send to the ``others`` side.
    """
    excluded = {id(p) for p in exclude}
    excluded |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            excluded |= {id(p) for p in head.parameters()}
    matrices, others, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in excluded:
            matrices.append(param)
        else:
            others.append(param)
    return matrices, others


def hybrid(
    model: nn.Module,
    matrix_optimizer: Callable[[list[nn.Parameter]], Optimizer],
    *,
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    exclude: Iterable[torch.Tensor] = (),
) -> HybridOptimizer:
    """``matrix_optimizer(matrices)`` for the matrices of ``model``, AdamW for the rest.

    AdamW (``lr``, ``betas``, ``eps``) decays the rank ≥ 2 parameters on its side (head, but not
    embeddings) by ``weight_decay`` and nothing else. Parts are named ``"adamw"`` (first: its lr
    is the one a scheduler's ``get_last_lr()[0]`` reports) and ``"matrix"``; empty parts are left
    out.

    Example::

        opt = hybrid(model, lambda ps: Muon(ps, lr=0.02), lr=3e-3, weight_decay=0.1)
    """
    matrices, others = split_parameters(model, exclude)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in others if p.ndim >= 2 and id(p) not in embedding_ids]
    no_decay = [p for p in others if p.ndim < 2 or id(p) in embedding_ids]
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    parts: dict[str, Optimizer] = {}
    if groups:
        parts["adamw"] = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    if matrices:
        parts["matrix"] = matrix_optimizer(matrices)
    return HybridOptimizer(parts)
