"""Deep Momentum Gradient Descent, DMGD (NL-23): the momentum is an MLP memory.

What the memory maps. For a weight ``W [n, d]`` the memory is an MLP ``m_θ: R^d → R^n``
(``depth`` linear maps ``A_1 [h, d], …, A_L [n, h]``, activation ``φ`` between them, no bias, no
residual). Its keys are the *rows* ``g_j ∈ R^d`` of the gradient (one per output unit j), its
values the columns ``e_j`` of the identity (NL-18/23's ``I``), and it is read at the one-hot keys
of the input units:

    L^{(2)}(θ; g) = Σ_j ⟨m_θ(g_j), e_j⟩ = tr m_θ(gᵀ)                 inner objective ("dot")
    θ_{i+1}       = R_α(θ_i) − η ∇_θ L^{(2)}(θ_i; g_i)               one inner GD step
    W_{i+1}       = (1 − η λ) W_i + m_{θ_{i+1}}(I_d)                 read: column k is m(e_k)

For ``depth = 1`` the memory is a matrix ``M``: ``∇_M tr(M gᵀ) = g`` and ``m(I) = M``, so DMGD is
exactly momentum, NL-17/18 (tested). For ``depth = 2`` the read is ``A_2 φ(A_1)``: a learned,
nonlinear factorization of the momentum. The ``"l2"`` objective ``½ Σ_j ‖m_θ(g_j) + e_j‖²`` (value
``−I``, the descent sign of NL-21) makes a depth-1 DMGD the delta-rule momentum
``M (α I − η gᵀg) − η g`` of NL-22 with ``P = I`` and an unnormalized ``γ = η`` (tested).

Decisions (ours; the print is loose here, SPEC §3 asks us to document them):

- The paper's example objective ``⟨m(u_iᵀ), 1⟩`` is read with ``1`` the identity of the value
  argument ``I`` (NL-23 writes ``L^{(2)}(m_i; u_i, I)``, NL-18 ``⟨m ∇Lᵀ, I⟩``). With an all-ones
  value the objective's gradient does not depend on the sign of ``g`` and the update does not
  descend. ``W + m_{i+1}(u_i)`` is read as the memory's output at the input units (``m(I)``): a
  linear memory read at ``g`` itself cannot give momentum, which DMGD generalizes (and NL-24 needs
  to recover Muon).
- All rows of ``g`` are written at the same ``θ_i`` (one chunk of the engine's chunked GD, tested
  against :func:`nestlearn.memory.mlp.forms.mlp_memory_reference`).
- Retention ``R_α`` multiplies the *output* map ``A_L`` by ``α``; the feature maps
  ``A_1..A_{L−1}`` are kept (retention 1). With ``α`` on every map the product ``A_L φ(A_1)``
  either collapses to 0 (when ``η‖g‖ < 1 − α`` the origin is a stable fixed point of the
  bilinear write) or grows without bound.
- ``φ = tanh`` by default. Write keys are gradients, read keys one-hot vectors, and only an odd
  ``φ`` keeps the read a descent direction whatever the gradient's signs: SiLU/GELU (offered)
  rectify the write and diverged on a convex quadratic where tanh and identity converge.
- Initialization: ``A_L = 0`` (the first read is 0, as ``m_0 = 0``), the other maps
  ``N(0, 1/h)`` from a generator seeded by ``seed`` and the parameter's index (the global RNG is
  not touched), so ``E[A_1ᵀA_1] = I`` and the first steps are about ``η g``, as momentum's.

Memory cost per matrix: ``h (d + n) + (L − 2) h²`` numbers (``n d`` for depth 1; ``h = min(n, d)``
by default, at most ``2 n d``) and, transiently, ``n²`` for the write's predictions.

``form="paper"``: SPEC §3's DMGD as written, for comparison (issue 15). The memory is an MLP
``m_θ: R^d → R^d`` applied to each row ``g_j`` of the gradient (maps ``A_1 [h, d], …, A_L [d, h]``;
depth 1: ``M [d, d]``), so ``m_θ(g)`` has ``W``'s shape ``[n, d]``:

    L^{(2)}(θ; g) = Σ_j ⟨m_θ(g_j), 𝟏⟩ = 𝟏_nᵀ m_θ(g) 𝟏_d            value: all-ones
    θ_{i+1}       = α θ_i − η ∇_θ L^{(2)}(θ_i; g_i)                  retention α on every map
    W_{i+1}       = (1 − η λ) W_i + m_{θ_{i+1}}(g_i)                 read at the gradient itself

Same initialization (``A_L = 0``), same activations; the objective is ``"dot"`` only (the L2
option is ours). For a linear memory the write is ``M_{i+1} = α M_i − η 𝟏 (g_iᵀ 𝟏)ᵀ``: ``M`` stays
``𝟏 cᵀ`` (rank one, every output coordinate equal) and the update ``g_i M_{i+1}ᵀ = (g_i c_{i+1})
𝟏ᵀ`` is constant along each row of ``W`` (tested): the printed objective does not give momentum,
which is why ours reads ``m(I)`` with value ``−I``. Memory cost ``h (2 d) + (L − 2) h²``
(``d²`` for depth 1). docs/optimizers.md compares both forms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nestlearn.memory.core.rules import get_objective, momentum, retain
from nestlearn.memory.mlp.forms import ACTIVATIONS as MLP_ACTIVATIONS
from nestlearn.optim.base import MemoryOptimizer, apply_update, as_matrix, check_int, check_unit

OBJECTIVES = ("dot", "l2")
FORMS = ("ours", "paper")  # module docstring: ours (default) and SPEC §3 as printed
# Odd activations first (module docstring); SiLU/GELU are the engine's (memory.mlp).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "identity": lambda x: x,
    **{name: fns[0] for name, fns in MLP_ACTIVATIONS.items()},
}


def memory_forward(weights: list[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """``m_θ(x)`` for keys ``x [N, d]`` -> ``[N, n]`` (maps ``[out, in]``, activation between)."""
    sigma = ACTIVATIONS[activation]
    for i, a in enumerate(weights):
        x = x @ a.mT
        if i < len(weights) - 1:
            x = sigma(x)
    return x


def memory_read(weights: list[torch.Tensor], activation: str) -> torch.Tensor:
    """``m_θ(I_d)`` as a matrix ``[n, d]`` whose column k is ``m_θ(e_k)``.

    The first map applied to the one-hot keys returns its own columns, so the identity is never
    built: ``A_L φ(… φ(A_1))``.
    """
    sigma = ACTIVATIONS[activation]
    x = weights[0]
    for a in weights[1:]:
        x = a @ sigma(x)
    return x


def dmgd_write(
    weights: list[torch.Tensor],
    grad: torch.Tensor,
    *,
    alpha: float,
    eta: float,
    objective: str,
    activation: str,
) -> list[torch.Tensor]:
    """``θ ← α θ − η ∇_θ L^{(2)}(θ; g)`` for a gradient ``g [n, d]`` (keys: its rows)."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_(True) for w in weights]
        pred = memory_forward(leaves, grad, activation)  # [n keys, n outputs]
        target = -torch.eye(grad.shape[0], dtype=grad.dtype, device=grad.device)
        loss = get_objective(objective).value(pred, target).sum()
        grads = torch.autograd.grad(loss, leaves)
    # Retention on the output map only (docstring): the stored content fades, the features stay.
    alphas = [None] * (len(weights) - 1) + [alpha]
    return [
        retain(w, a) + momentum(None, g, 0.0, eta)
        for w, g, a in zip(weights, grads, alphas, strict=True)
    ]


def dmgd_write_paper(
    weights: list[torch.Tensor], grad: torch.Tensor, *, alpha: float, eta: float, activation: str
) -> list[torch.Tensor]:
    """SPEC §3's write: ``θ ← α θ − η ∇_θ Σ_j ⟨m_θ(g_j), 𝟏⟩`` (every map retained by ``α``) for
    a gradient ``g [n, d]`` whose rows are the keys and a memory ``m_θ: R^d → R^d``."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_(True) for w in weights]
        loss = memory_forward(leaves, grad, activation).sum()  # ⟨m(g_j), 𝟏⟩ summed over rows
        grads = torch.autograd.grad(loss, leaves)
    return [
        retain(w, alpha) + momentum(None, g, 0.0, eta) for w, g in zip(weights, grads, strict=True)
    ]


class DeepMomentum(MemoryOptimizer):
    """DMGD (module docstring). Matrix-only; rank > 2 parameters read as ``[shape[0], -1]``.

    ``lr`` is the memory's inner step ``η`` (as in NL-17), ``momentum`` its retention ``α``,
    ``hidden = 0`` means ``min(n, d)``. ``form``: ``"ours"`` (default) or ``"paper"`` (SPEC §3 as
    printed, module docstring). State: ``w.{i}`` (the memory's maps).
    """

    matrix_only = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        momentum: float = 0.9,
        depth: int = 2,
        hidden: int = 0,
        activation: str = "tanh",
        objective: str = "dot",
        weight_decay: float = 0.0,
        seed: int = 0,
        vector_rule: str | None = None,
        form: str = "ours",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "depth": depth,
            "hidden": hidden,
            "activation": activation,
            "objective": objective,
            "weight_decay": weight_decay,
            "seed": seed,
            "vector_rule": vector_rule,
            "form": form,
        }
        self._index: dict[torch.Tensor, int] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._index.setdefault(p, len(self._index))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_unit("DeepMomentum", "momentum", group["momentum"])
        check_int("DeepMomentum", "depth", group["depth"])
        check_int("DeepMomentum", "hidden", group["hidden"], minimum=0)
        check_int("DeepMomentum", "seed", group["seed"], minimum=0)
        if group["activation"] not in ACTIVATIONS:
            raise ValueError(
                f"DeepMomentum: activation={group['activation']!r}; choose one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if group["objective"] not in OBJECTIVES:
            raise ValueError(
                f"DeepMomentum: objective={group['objective']!r}; choose one of {OBJECTIVES}"
            )
        form = group.setdefault("form", "ours")  # groups saved before the option: ours
        if form not in FORMS:
            raise ValueError(f"DeepMomentum: form={form!r}; choose one of {FORMS}")
        if form == "paper" and group["objective"] != "dot":
            raise ValueError(
                "DeepMomentum: form='paper' has the paper's dot objective ⟨m(g), 𝟏⟩ only; "
                f"got objective={group['objective']!r} (use objective='dot', or form='ours')"
            )

    def init_memory(self, param: torch.Tensor, group: dict[str, Any]) -> list[torch.Tensor]:
        """The memory's maps before any write (module docstring, Initialization)."""
        n, d = as_matrix(param).shape
        depth, hidden = group["depth"], group["hidden"] or min(n, d)
        out = d if group.get("form", "ours") == "paper" else n  # paper: m maps R^d to R^d
        if depth == 1:
            return [param.new_zeros(out, d)]
        generator = torch.Generator().manual_seed(group["seed"] * 1_000_003 + self._index[param])
        shapes = [(hidden, d)] + [(hidden, hidden)] * (depth - 2)
        maps = [
            (torch.randn(shape, generator=generator, dtype=torch.float64) / hidden**0.5).to(
                device=param.device, dtype=param.dtype
            )
            for shape in shapes
        ]
        return [*maps, param.new_zeros(out, hidden)]

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        depth = group["depth"]
        if "w.0" not in state:
            for i, w in enumerate(self.init_memory(param, group)):
                state[f"w.{i}"] = w
        old = [state[f"w.{i}"] for i in range(depth)]
        g, alpha, eta, act = as_matrix(grad), group["momentum"], group["lr"], group["activation"]
        if group.get("form", "ours") == "paper":  # groups saved before the option: ours
            weights = dmgd_write_paper(old, g, alpha=alpha, eta=eta, activation=act)
            read = memory_forward(weights, g, act)  # m_{i+1}(g_i): the rows of the update
        else:
            weights = dmgd_write(
                old, g, alpha=alpha, eta=eta, objective=group["objective"], activation=act
            )
            read = memory_read(weights, act)
        for i, w in enumerate(weights):
            state[f"w.{i}"] = w
        apply_update(param, read, group["lr"], group["weight_decay"])
