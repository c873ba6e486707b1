"""Short causal depthwise convolution (width 4), as on q/k/v in Titans and Gated DeltaNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """``y_t = silu(Σ_{i<w} c_i ⊙ x_{t−i})`` per channel (depthwise, causal, no bias).

    The recurrent state is the last ``w − 1`` inputs, ``[B, dim, w − 1]``, so a sequence processed
    in pieces (or token by token) gives the same outputs as in one call.
    """

    def __init__(self, dim: int, width: int = 4, activation: bool = True) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ShortConv width must be >= 1, got {width}")
        self.dim, self.width, self.activation = dim, width, activation
        self.weight = nn.Parameter(torch.empty(dim, 1, width))
        # Conv1d's default init (uniform, fan-in = width).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.width - 1, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state [B, dim, w−1])``."""
        B, dim = x.shape[0], x.shape[-1]
        if x.ndim != 3 or dim != self.dim:
            raise ValueError(f"ShortConv expects [B, T, {self.dim}] inputs, got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        elif state.shape != (B, self.dim, self.width - 1):
            raise ValueError(
                f"ShortConv state must be [{B}, {self.dim}, {self.width - 1}], "
                f"got {tuple(state.shape)} (a state from another layer?)"
            )
        return short_conv(x, self.weight, state, self.activation)


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, activation: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`ShortConv`'s forward on checked inputs: ``x [B, T, D]`` (any strides), depthwise
    ``weight [D, 1, w]``, ``state [B, D, w−1]`` -> ``(y [B, T, D], new state [B, D, w−1])``.

    ``y_t = silu(Σ_{i<w} weight[:, 0, w−1−i] ⊙ x_{t−i})`` with ``x_{t<0}`` read from ``state``.
    The backward is hand-written (:class:`_ShortConvFn`); the values are those of the plain ops.
    (One call over several projections' concatenated channels measured slower on the CPU than
    one call each: the larger tensors fall out of cache.)
    """
    y, new_state = _ShortConvFn.apply(x, weight.to(x.dtype), state.to(x.dtype), activation)
    # The state holds past inputs: under autocast they are exact in x's dtype, and the state
    # keeps its own dtype from call to call (float32 from init_state).
    return y, new_state.to(state.dtype)


def _padded(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``[B, w−1+T, D]``: the carried inputs, then ``x`` (time-major)."""
    return torch.cat([state.transpose(1, 2), x], dim=1)


def _last_inputs(padded: torch.Tensor, width: int) -> torch.Tensor:
    """The new state ``[B, D, w−1]``: the last ``w − 1`` rows of ``padded [B, w−1+T, D]``."""
    return padded[:, padded.shape[1] - (width - 1) :].transpose(1, 2)


def _conv(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The depthwise causal conv of ``padded [B, w−1+T, D]`` -> pre-activation ``[B, T, D]``.

    Time-major throughout, by a channels-last depthwise conv2d, so that the output is a
    contiguous ``[B, T, D]`` (conv1d on ``[B, D, T]`` would hand its consumers a transposed view,
    and every later per-token op would stride across time).
    """
    y = F.conv2d(
        padded.transpose(1, 2).unsqueeze(2),  # [B, D, 1, w−1+T], channels-last in memory
        weight.unsqueeze(2),
        groups=weight.shape[0],
    )
    return y.squeeze(2).transpose(1, 2)


def _plain(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, activation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward in differentiable ops (what :class:`_ShortConvFn` computes)."""
    padded = _padded(x, state)
    y = _conv(padded, weight)
    new_state = _last_inputs(padded, weight.shape[-1])
    return (F.silu(y) if activation else y), new_state


# Elements of one product in the weight gradient: 2 MB in float32, about what a core's cache keeps
# (on the CPU, one product over a whole [B, T, D] batch runs several times slower per element).
_TAP_BLOCK = 1 << 19


def _tap_grads(g: torch.Tensor, padded: torch.Tensor, width: int) -> torch.Tensor:
    """``∂c_j = Σ_{b,t} G_{b,t} ⊙ P_{b,t+j}`` for ``j < width``: ``[D, width]``.

    One product and one sum over ``(b, t)`` per tap and block of batch rows, the blocks sized so
    that each product stays in cache.
    """
    B, T, D = g.shape
    rows = max(1, _TAP_BLOCK // max(1, T * D))
    taps = []
    for j in range(width):
        parts = [
            (g[b : b + rows] * padded[b : b + rows, j : j + T]).sum((0, 1))
            for b in range(0, B, rows)
        ]
        taps.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
    return torch.stack(taps, dim=-1)


class _ShortConvFn(torch.autograd.Function):
    """``silu(conv(x))`` and the new state, with the conv's gradients taken by hand.

    With ``P = [state; x]`` ``[B, w−1+T, D]``, ``y_t = Σ_j c_j ⊙ P_{t+j}`` and ``G = ∂y``
    (through silu): ``∂P_s = Σ_j c_j ⊙ G_{s−j}`` (the conv's input gradient, plus the new
    state's gradient on the last ``w−1`` rows) and ``∂c_j = Σ_{b,t} G_t ⊙ P_{t+j}``, by
    products and sums in cache-sized blocks (:func:`_tap_grads`), about five times faster on
    the CPU than the conv backward's weight gradient. It saves ``x`` and the state rather than
    ``P`` (one concatenation again in the backward, no more memory than autograd's) and, under
    ``create_graph``, differentiates the plain ops instead, so second derivatives are exact.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, activation: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        padded = _padded(x, state)
        y = _conv(padded, weight)
        new_state = _last_inputs(padded, weight.shape[-1])
        ctx.save_for_backward(x, weight, state, y)
        ctx.activation = activation
        return (F.silu(y) if activation else y), new_state

    @staticmethod
    def backward(
        ctx, grad: torch.Tensor | None, grad_state: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, state, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: through the plain ops
            outputs = _plain(x, weight, state, ctx.activation)
            pairs = [
                (o, g) for o, g in zip(outputs, (grad, grad_state), strict=True) if g is not None
            ]
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                (x, weight, state),
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
            return (*grads, None)
        # (both gradients arrive materialized: zeros for an output that was not used)
        width, D = weight.shape[-1], weight.shape[0]
        T = y.shape[1]
        padded = _padded(x, state)
        g = torch.ops.aten.silu_backward(grad, y) if ctx.activation else grad
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _tap_grads(g, padded, width).unsqueeze(1)  # [D, 1, w]
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            return None, grad_w, None, None
        # the conv's input gradient, on [B, D, 1, ·] channels-last views as in the forward
        grad_p = torch.ops.aten.convolution_backward(
            g.transpose(1, 2).unsqueeze(2),
            padded.transpose(1, 2).unsqueeze(2),
            weight.unsqueeze(2),
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            D,
            [True, False, False],
        )[0]
        grad_p = grad_p.squeeze(2).transpose(1, 2)  # [B, w−1+T, D]
        if width > 1:
            grad_p[:, T:] += grad_state.transpose(1, 2)
        return grad_p[:, width - 1 :], grad_w, grad_p[:, : width - 1].transpose(1, 2), None
