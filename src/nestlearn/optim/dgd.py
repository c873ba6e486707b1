"""Delta gradient descent, DGD (NL-27..29; arXiv Eqs 56–57), as an outer optimizer for nn.Linear.

Backprop writes a linear layer ``y = W x`` with the dot-product objective ``⟨W x_t, δ_t⟩``
(NL-26); DGD uses the L2 objective ``½‖W x_t − u_t‖²`` with target ``u_t = −δ_t``. Its proximal
step of size ``η`` with a unit-norm ``x_t`` is, by Sherman–Morrison (SPEC §3, corrected sign),

    W_{t+1} = (W_t − η δ_t x_tᵀ)(I + η x_t x_tᵀ)^{-1} = W_t (I − η' x_t x_tᵀ) − η' δ_t x_tᵀ,
    η' = η / (1 + η)

(:func:`nestlearn.memory.core.rules.dgd_projection` is the first term). ``I − η' x xᵀ`` is
non-expansive: the projection never grows the weight.

Batched form (ours, not the paper's). An outer step sees ``N`` tokens at once (every position of
every sequence of every micro-batch); the training loss is their mean, so autograd's gradient is
``G = (1/N) Σ_t δ_t x_tᵀ`` with ``δ_t`` already carrying the ``1/N``. Taking the proximal step of
the *summed* per-token L2 objectives with step ``η = N·lr`` and unit-norm inputs
``x̂_t = x_t / ‖x_t‖`` in the projection gives

    W ← (W − lr·G)(I + lr·C)^{-1},          C = E[x̂ x̂ᵀ] = (1/N) Σ_t x̂_t x̂_tᵀ   [d_in, d_in]

which is NL-29 exactly for ``N = 1``. ``C`` is K-FAC's input factor with normalized inputs: PSD
with trace 1, so every eigenvalue of ``(I + lr·C)^{-1}`` lies in ``[1/(1 + lr), 1]`` and the map
is non-expansive for every ``lr ≥ 0`` (the normalization that replaces ``‖x‖ = 1``). The gradient
term keeps autograd's ``G`` (raw inputs); only the projection uses normalized ones.

Inputs are captured by forward hooks on the ``nn.Linear`` modules of ``model`` whose weights this
optimizer updates, only in training mode with gradients enabled; ``Σ x̂ x̂ᵀ`` and ``N`` accumulate
over every forward since the last ``step``/``zero_grad`` — all micro-batches of a gradient
accumulation, so the step equals the one on the whole batch (tested) — and are cleared by both.
They are transient: ``state_dict`` holds nothing of them (save between steps). A layer called
twice per step (shared weights) contributes both inputs. Activation checkpointing re-runs
forwards during the backward and would count those inputs twice: do not combine the two. Memory:
``d_in²`` per layer, transient; cost: one ``d_in × d_in`` Cholesky solve per layer per step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.optim.base import MemoryOptimizer


def dgd_update(
    weight: torch.Tensor, grad: torch.Tensor, gram: torch.Tensor, lr: float
) -> torch.Tensor:
    """``(W − lr·G)(I + lr·C)^{-1}`` for ``W, G [n, d]`` and the input factor ``C [d, d]``."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor = torch.linalg.cholesky(eye + lr * gram)
    target = (weight - lr * grad).to(gram.dtype)
    # X (I + lr C) = T  <=>  (I + lr C) Xᵀ = Tᵀ (the factor is symmetric).
    return torch.cholesky_solve(target.mT, factor).mT.to(weight.dtype)


class DeltaGD(MemoryOptimizer):
    """DGD for the weights of the ``nn.Linear`` modules in ``model`` (module docstring).

    ``params`` must contain only such weights (plus rank < 2 parameters if
    ``vector_rule="adam"``, e.g. their biases); any other matrix is refused at construction.
    A weight that has a gradient but no captured inputs (its layer was bypassed, e.g. by
    ``F.linear(x, layer.weight[...])``) raises at ``step`` with ``missing_inputs="error"``; with
    ``"gradient"`` it takes the plain step ``W − lr·G`` (``C = 0``) and a warning names it once.
    """

    matrix_only = True

    def __init__(
        self,
        params: Iterable,
        model: nn.Module,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        vector_rule: str | None = None,
        missing_inputs: str = "error",
    ) -> None:
        if missing_inputs not in ("error", "gradient"):
            raise ValueError(
                f"DeltaGD: missing_inputs={missing_inputs!r}; choose 'error' or 'gradient'"
            )
        self.missing_inputs = missing_inputs
        self._warned: set[int] = set()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"DeltaGD needs the model (an nn.Module) to capture layer inputs, got {model!r}"
            )
        self._linears = {m.weight: m for m in model.modules() if isinstance(m, nn.Linear)}
        self._inputs: dict[torch.Tensor, list] = {}
        self._hooks: list = []
        defaults = {"lr": lr, "weight_decay": weight_decay, "vector_rule": vector_rule}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        this = weakref.ref(self)
        for p in self.param_groups[-1]["params"]:
            if p.ndim < 2:
                continue
            if p not in self._linears:
                raise ValueError(
                    f"DeltaGD updates weights of nn.Linear layers (it reads their inputs), got a "
                    f"parameter of shape {list(p.shape)} that is not one in `model`; give it to "
                    "another optimizer (nestlearn.optim.hybrid routes embeddings to AdamW)"
                )
            module = self._linears[p]
            hook = _capture_hook(this, p)
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))

    def capture(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate ``Σ x̂ x̂ᵀ`` and the token count for the layer of ``weight``."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        x = F.normalize(x.detach().reshape(-1, x.shape[-1]).to(dtype), dim=-1)
        entry = self._inputs.get(weight)
        if entry is None:
            self._inputs[weight] = [x.mT @ x, x.shape[0]]
        else:
            entry[0].addmm_(x.mT, x)
            entry[1] += x.shape[0]

    def clear_inputs(self) -> None:
        """Forget the inputs captured since the last step."""
        self._inputs.clear()

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model (the optimizer then cannot step its weights)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.clear_inputs()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        try:
            return super().step(closure)
        finally:
            self.clear_inputs()

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        entry = self._inputs.get(param)
        if entry is None and self.missing_inputs == "gradient":
            if id(param) not in self._warned:
                self._warned.add(id(param))
                warnings.warn(
                    f"DeltaGD: no inputs captured for the weight of shape {list(param.shape)} "
                    "(its nn.Linear forward was bypassed); it takes plain gradient steps",
                    stacklevel=3,
                )
            entry = [param.new_zeros(param.shape[1], param.shape[1]), 1]
        if entry is None:
            raise ValueError(
                f"DeltaGD: no inputs were captured for the nn.Linear weight of shape "
                f"{list(param.shape)} since the last step; run the forward pass in training mode "
                "with gradients enabled (inputs are read by forward hooks) before step()"
            )
        lr, decay = group["lr"], group["weight_decay"]
        # Decoupled weight decay is retention of W before the step, as in every optimizer here.
        weight = param * (1.0 - lr * decay) if decay else param
        param.copy_(dgd_update(weight, grad, entry[0] / entry[1], lr))


def _capture_hook(optimizer_ref: weakref.ref, weight: torch.Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        optimizer = optimizer_ref()
        if optimizer is None or not module.training or not torch.is_grad_enabled():
            return
        if not weight.requires_grad:
            return
        optimizer.capture(weight, args[0] if args else kwargs["input"])

    return hook
