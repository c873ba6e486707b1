"""Continuum Memory System (SPEC §4, NL-30/31): k MLP levels, level l updated every C(l) tokens.

Each level is pre-norm and residual: ``z = RMSNorm_l(h)``, ``out = SwiGLU_{θ^(l)}(z)``, and its
weights ``θ^(l)`` (per sequence, ``[B, out, in]``) start from the meta-learned ``θ_0^(l)`` (the
module's parameters) and take one inner step after each complete chunk of ``C(l)`` tokens
(:mod:`nestlearn.memory.cms`). The module maps the residual stream ``x [B, T, d]`` to the update
it adds (a block computes ``x + cms(x)``):

    sequential   h_0 = x,  h_l = h_{l-1} + SwiGLU_l(norm_l(h_{l-1})),  cms(x) = h_k − x
    nested       the same chain; level l+1 is re-initialised from level l's current weights
                 at every multiple of R(l+1) = C(l+1)·⌈C(l)/C(l+1)⌉ tokens, position 0 included,
                 so only level 0 owns meta-learned weights (chunk sizes non-increasing)
    independent  cms(x) = Σ_l a_l SwiGLU_l(norm_l(x)),  a = softmax(learned logits)

Error sources (``docs/cms.md``): ``local``, ``½‖SwiGLU(z_s) − sg(z_{s+1})‖²`` (each level learns
to map its input to the next token's input; no second pass, differentiable); ``teach``, the
gradient of the next-token cross-entropy at the level's output stream ``h_s`` through the final
norm and head only (:class:`Teacher`, the logit-lens approximation of SPEC §4's teach signal;
exact for the last level of the last block), stop-gradient.
Inner step (``step``): ``normalized`` (``η / (1 + E)``, ours, default) or ``plain`` (NL-31's
summed step at rate ``η``; :mod:`nestlearn.memory.cms`, docs/cms.md).
``recompute=True`` keeps only each level's inputs for backward and recomputes its chunk chain
there, the teach errors replayed (:func:`recomputed_level`): less memory, the same gradients.
With k = 1, ``sequential`` and a zero learning rate this is a Transformer's ``x + MLP(norm(x))``.
The block may instead be GPT-2's (``mlp="gelu_tanh"``: ``W2 gelu_tanh(W1 z + b1) + b2``), with
biases (``bias=True``) and a LayerNorm (``norm="layer"``), so that a pretrained model's MLPs drop
in exactly (:meth:`ContinuumMemory.init_level_from`, docs/level-stacking.md).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from nestlearn.layers.mlp import SwiGLU
from nestlearn.layers.norm import NORMS, make_norm
from nestlearn.levels import Level
from nestlearn.memory.cms import (
    OPTIMIZERS,
    STEPS,
    Weights,
    cms_level_chunk,
    cms_level_reference,
    init_cms_level_state,
    local_error,
)

State = dict[str, torch.Tensor]
# on_level(level, input, output, state) of ContinuumMemory.forward
LevelHook = Callable[[int, torch.Tensor, torch.Tensor, State | None], None]
VARIANTS = ("sequential", "nested", "independent")
OBJECTIVES = ("local", "teach")
MODES = ("chunk", "reference")
# Block kind -> (activation σ of nestlearn.memory.cms, gated).
MLPS = {"swiglu": ("silu", True), "gelu_tanh": ("gelu_tanh", False)}


class Teacher(NamedTuple):
    """The teach signal's source: ``error(h [B, n, d], targets [B, n]) -> ∂CE/∂h`` and the token
    ids ``tokens [B, T]`` of the call; position ``s``'s target is the token at ``s + 1``."""

    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tokens: torch.Tensor


class CMSLevel(nn.Module):
    """One level's pre-norm and, unless it inherits them (nested), its initial weights θ_0:
    ``w1, (w3), w2`` and, with biases, ``b1, (b3), b2`` (``w3``/``b3`` for a gated block)."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        eps: float,
        owns_weights: bool,
        gated: bool = True,
        bias: bool = False,
        norm: str = "rms",
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, d_model, eps)
        self.names: tuple[str, ...] = ()
        if owns_weights:
            shapes = {"w1": (hidden, d_model), "w3": (hidden, d_model), "w2": (d_model, hidden)}
            shapes |= {"b1": (hidden,), "b3": (hidden,), "b2": (d_model,)}
            names = ["w1", "w3", "w2"] if gated else ["w1", "w2"]
            if bias:
                names += ["b1", "b3", "b2"] if gated else ["b1", "b2"]
            for name in names:
                setattr(self, name, nn.Parameter(torch.empty(shapes[name])))
            self.names = tuple(names)

    def weights(self) -> Weights:
        return {name: getattr(self, name) for name in self.names}


class ContinuumMemory(nn.Module):
    """``k`` SwiGLU levels with per-level chunk sizes and inner learning rates: ``[B, T, d] ->
    [B, T, d]`` (the residual update), with an optional decoding state."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        chunk_sizes: Sequence[int],
        lrs: Sequence[float],
        *,
        variant: str = "sequential",
        objective: str = "local",
        optimizer: str = "gd",
        momentum: float = 0.9,
        detach_inner: bool = False,
        mode: str = "chunk",
        eps: float = 1e-6,
        mlp: str = "swiglu",
        bias: bool = False,
        norm: str = "rms",
        step: str = "normalized",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        check_cms_options(
            d_model,
            hidden,
            chunk_sizes,
            lrs,
            variant,
            objective,
            optimizer,
            momentum,
            mode,
            step=step,
        )
        check_block_options(mlp, norm)
        self.mlp, self.bias, self.norm_kind = mlp, bool(bias), norm
        self.activation, gated = MLPS[mlp]
        self.d_model, self.hidden = d_model, hidden
        self.chunk_sizes, self.lrs = [int(c) for c in chunk_sizes], [float(r) for r in lrs]
        self.variant, self.objective, self.optimizer = variant, objective, optimizer
        self.momentum, self.detach_inner, self.mode = float(momentum), bool(detach_inner), mode
        self.step, self.recompute = step, bool(recompute)
        self.levels = nn.ModuleList(
            CMSLevel(
                d_model,
                hidden,
                eps,
                owns_weights=variant != "nested" or i == 0,
                gated=gated,
                bias=bias,
                norm=norm,
            )
            for i in range(len(self.chunk_sizes))
        )
        if variant == "independent":
            self.agg_logits = nn.Parameter(torch.zeros(len(self.chunk_sizes)))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """``w1, w3 ~ N(0, std)``, ``w2 ~ N(0, out_std)`` (default ``std``), biases 0, gains 1,
        equal aggregation weights."""
        for level in self.levels:
            nn.init.ones_(level.norm.weight)
            if getattr(level.norm, "bias", None) is not None:
                nn.init.zeros_(level.norm.bias)
            for name in level.names:
                param = getattr(level, name)
                if name[0] == "b":
                    nn.init.zeros_(param)
                elif name == "w2":
                    nn.init.normal_(param, std=std if out_std is None else out_std)
                else:
                    nn.init.normal_(param, std=std)
        if self.variant == "independent":
            nn.init.zeros_(self.agg_logits)

    @torch.no_grad()
    def init_level_from(
        self,
        level: int,
        mlp: SwiGLU | Mapping[str, torch.Tensor],
        norm: nn.Module | None = None,
        *,
        zero_output: bool = False,
    ) -> None:
        """Ad-hoc level stacking (SPEC §4): ``θ_0^(level)`` (and its norm) from a trained MLP,
        e.g. a pretrained Transformer block's ``mlp`` and ``mlp_norm``.

        ``mlp``: a :class:`~nestlearn.layers.mlp.SwiGLU` or a mapping with this level's names
        (``w1, (w3), w2, (b1, (b3), b2)``, shapes as the parameters). ``zero_output``: set the
        output map ``w2`` (and ``b2``) to zero after copying, so the level starts as a zero
        residual (exact recovery with extra sequential levels, docs/level-stacking.md).
        """
        target = self.levels[level]
        if not target.names:
            raise ValueError(f"level {level} of a nested CMS inherits its weights from level 0")
        if isinstance(mlp, SwiGLU):
            mlp = {name: getattr(mlp, name).weight for name in ("w1", "w3", "w2")}
        if set(mlp) != set(target.names):
            raise ValueError(
                f"init_level_from: level {level} has weights {list(target.names)}, "
                f"got {sorted(mlp)}; build the CMS with the mlp/bias options of the source MLP"
            )
        for name in target.names:
            param, value = getattr(target, name), mlp[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"init_level_from: '{name}' of level {level} has shape {list(param.shape)}, "
                    f"got {list(value.shape)}; set the CMS hidden width to the source's"
                )
            param.copy_(value)
            if zero_output and name in ("w2", "b2"):
                param.zero_()
        if norm is not None:
            if type(norm) is not type(target.norm) or norm.eps != target.norm.eps:
                raise ValueError(
                    f"init_level_from: the norm ({type(norm).__name__}, eps {norm.eps:g}) differs "
                    f"from the CMS's ({type(target.norm).__name__}, eps {target.norm.eps:g}); "
                    "build the CMS with the source's norm kind and eps"
                )
            target.norm.load_state_dict(norm.state_dict())

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """Per level ``l``: ``{l}.*``, the state of :mod:`nestlearn.memory.cms` (weights of the
        current chunk, chunk accumulators, pending key, position)."""
        state: State = {}
        ctx_dim = self.d_model if self.objective == "teach" else None
        for i in range(len(self.levels)):
            weights = {k: v.detach() for k, v in self._initial_weights(i).items()}
            sub = init_cms_level_state(
                weights, batch_size, optimizer=self.optimizer, ctx_dim=ctx_dim
            )
            for key, value in sub.items():
                value = value.to(device=device)
                if value.is_floating_point() and dtype is not None:
                    value = value.to(dtype)
                state[f"{i}.{key}"] = value
        return state

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        teacher: Teacher | None = None,
        on_level: LevelHook | None = None,
    ) -> tuple[torch.Tensor, State | None]:
        """The residual update for ``x [B, T, d]``; with a state, continue from it and return
        the new one. ``teacher`` is required by the ``teach`` objective. ``on_level(l, h, y,
        state)`` is called after each level with its input ``h [B, T, d]`` (before the level's
        norm), output ``y`` and new state (``None`` without a state), e.g. to check them
        (``model.check_finite``)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected [B, T, {self.d_model}], got {list(x.shape)}")
        if self.objective == "teach":
            _check_teacher(teacher, x)
        run = cms_level_chunk if self.mode == "chunk" else cms_level_reference
        agg = torch.softmax(self.agg_logits, 0) if self.variant == "independent" else None
        h, total = x, None
        new_state: State | None = None if state is None else {}
        history: dict[int, Weights] | None = None
        for i, level in enumerate(self.levels):
            base = x if self.variant == "independent" else h
            z = level.norm(base)
            scale = 1.0 if agg is None else agg[i]
            sub = None if state is None else _sub_state(state, f"{i}.")
            extra = self._error_args(base, scale, teacher)
            reset = self._reset(i, history)
            history = {} if self.variant == "nested" and i + 1 < len(self.levels) else None
            kwargs = {
                "lr": self.lrs[i],
                "chunk_size": self.chunk_sizes[i],
                "optimizer": self.optimizer,
                "momentum": self.momentum,
                "reset": reset,
                "initial_state": sub,
                "output_final_state": state is not None,
                "detach_inner": self.detach_inner,
                "history": history,
                "activation": self.activation,
                "step": self.step,
                **extra,
            }
            if self._recomputes(state):
                y, sub = recomputed_level(run, z, self._initial_weights(i), kwargs, self.objective)
            else:
                y, sub = run(z, self._initial_weights(i), **kwargs)
            if on_level is not None:
                on_level(i, base, y, sub)
            y = y * scale if agg is not None else y
            total = y if total is None else total + y
            h = h + y if agg is None else h
            if new_state is not None:
                new_state.update({f"{i}.{k}": v for k, v in sub.items()})
        return total, new_state

    def _recomputes(self, state: State | None) -> bool:
        """``recompute`` applies to a training call: chunk form, gradients on, no state (the
        nested variant's reset history crosses levels, so it is left out)."""
        return (
            self.recompute
            and self.mode == "chunk"
            and self.variant != "nested"
            and state is None
            and torch.is_grad_enabled()
        )

    def _initial_weights(self, i: int) -> Weights:
        level = self.levels[i] if self.levels[i].names else self.levels[0]
        return level.weights()

    def _error_args(self, base: torch.Tensor, scale, teacher: Teacher | None) -> dict:
        if self.objective == "local":
            return {"error": local_error}
        # ∂L/∂out_l = a_l ∂L/∂h at h = base + a_l out_l (a_l = 1 in a chain); a_l is not trained
        # through the teach signal.
        a = scale.detach() if isinstance(scale, torch.Tensor) else scale

        def error(y: torch.Tensor, key_base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return a * teacher.error(key_base + a * y.detach(), targets)

        return {"error": error, "key_ctx": base.detach(), "target_ctx": teacher.tokens}

    def _reset(self, i: int, history: dict[int, Weights] | None):
        """Nested: level i starts from level i−1's weights at every multiple of R(i)."""
        if self.variant != "nested" or i == 0:
            return None
        parent, own = self.chunk_sizes[i - 1], self.chunk_sizes[i]
        period = own * math.ceil(parent / own)

        def reset(pos: int) -> Weights | None:
            return history[pos // parent] if pos % period == 0 else None

        return reset

    def inner_levels(self) -> list[Level]:
        d, h = self.d_model, self.hidden
        objective = {
            "local": "l2: ½‖MLP(z_t) − sg(z_{t+1})‖² (next input)",
            "teach": "next-token CE at the level output (logit lens), stop-grad",
        }[self.objective]
        optimizer = {
            "gd": "GD",
            "momentum": f"GD + momentum μ={self.momentum:g}",
            "dgd": "DGD (chunk-mean projection)",
        }[self.optimizer]
        rate = "plain η" if self.step == "plain" else "η"  # normalized: η/(1+E), docs/cms.md
        out = []
        for i, (C, lr) in enumerate(zip(self.chunk_sizes, self.lrs, strict=True)):
            kind = "SwiGLU" if self.mlp == "swiglu" else "GELU(tanh) MLP"
            memory = f"{kind} {d} -> {h} -> {d} per sequence ({self.variant})"
            if self.variant == "nested" and i > 0:
                period = C * math.ceil(self.chunk_sizes[i - 1] / C)
                memory += f", reset from level {i - 1} every {period} tokens"
            out.append(Level(f"levels.{i}", memory, objective, f"{optimizer}, {rate}={lr:g}", C))
        return out

    def outer_periods(self) -> dict[str, int]:
        """Parameter name (relative to this module) -> C(l): each level's meta-parameters are
        stepped every C(l) optimizer steps in the outer level (SPEC §4, "across steps")."""
        return {
            f"levels.{i}.{name}": self.chunk_sizes[i]
            for i, level in enumerate(self.levels)
            for name, _ in level.named_parameters()
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the read (``6·d·h`` per level) and, for a level that updates
        within ``seq_len`` tokens, its error term (forward of the key shared with the read,
        backward ``8·d·h``, DGD projections ``12·d·h``; only for the tokens of chunks whose update
        is read later in the window, :func:`updating_fraction`) and its update amortized over the
        chunk.
        The teach signal's head is counted by the model. An ungated block has two maps of the
        SwiGLU's three: every term scales by 2/3."""
        dh = self.d_model * self.hidden * (1.0 if MLPS[self.mlp][1] else 2.0 / 3.0)
        total = 0.0
        for chunk in self.chunk_sizes:
            total += 6 * dh
            if chunk < seq_len:
                error = 8 * dh + (12 * dh if self.optimizer == "dgd" else 0)
                total += error * updating_fraction(chunk, seq_len) + 6 * dh / chunk
        return total


class _Replay:
    """An error source that records its outputs on the first pass and replays them on the
    recomputation: the teach signal is a stop-gradient constant (the head's forward/backward),
    and the recomputed pass reads the same ``y`` bit for bit, so its errors are the same."""

    def __init__(self, error: Callable[..., torch.Tensor]) -> None:
        self.error, self.saved, self.calls = error, [], 0

    def __call__(self, y: torch.Tensor, key_ctx, targets: torch.Tensor) -> torch.Tensor:
        if self.calls < len(self.saved):
            delta = self.saved[self.calls]
        else:
            delta = self.error(y, key_ctx, targets)
            self.saved.append(delta)
        self.calls += 1
        return delta


def recomputed_level(
    run: Callable[..., tuple[torch.Tensor, State | None]],
    z: torch.Tensor,
    weights: Weights,
    kwargs: dict,
    objective: str,
) -> tuple[torch.Tensor, State | None]:
    """``run(z, weights, **kwargs)`` under :func:`torch.utils.checkpoint.checkpoint`
    (non-reentrant): the backward keeps only the level's inputs and recomputes the chunk chain
    (every chunk's weights ``θ_c`` and its within-chunk intermediates) when it reaches the
    level, so at most one level's activations are alive at once. With ``teach`` the head's
    errors are not recomputed but replayed (:class:`_Replay`): the recomputation costs the
    level's forward without the teach signal. Same outputs and gradients, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    if objective == "teach":
        kwargs = {**kwargs, "error": _Replay(kwargs["error"])}

    def level(z: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, State | None]:
        if objective == "teach":
            kwargs["error"].calls = 0
        return run(z, dict(zip(weights, values, strict=True)), **kwargs)

    return checkpoint(level, z, *weights.values(), use_reentrant=False)


def updating_fraction(chunk_size: int, seq_len: int) -> float:
    """Share of a ``seq_len`` window (from position 0, no state kept) whose error terms a level
    of chunk ``C`` computes: the tokens of the chunks that complete before the window ends,
    ``C·⌊(T − 1)/C⌋ / T`` (the last chunk's update would be read by no token)."""
    return chunk_size * ((seq_len - 1) // chunk_size) / seq_len


def check_cms_options(
    d_model: int,
    hidden: int,
    chunk_sizes: Sequence[int],
    lrs: Sequence[float],
    variant: str,
    objective: str,
    optimizer: str,
    momentum: float,
    mode: str = "chunk",
    prefix: str = "",
    step: str = "normalized",
) -> None:
    """ValueError naming the first bad option (``prefix`` + its name), with the valid choices or
    the fix."""
    if d_model < 1 or hidden < 1:
        raise ValueError(f"d_model={d_model} and {prefix}hidden={hidden} must be >= 1")
    for name, value, choices in (
        ("variant", variant, VARIANTS),
        ("objective", objective, OBJECTIVES),
        ("optimizer", optimizer, OPTIMIZERS),
        ("mode", mode, MODES),
        ("step", step, STEPS),
    ):
        if value not in choices:
            raise ValueError(
                f"{prefix}{name}: unknown '{value}'; choose one of {', '.join(choices)}"
            )
    cs, lr = f"{prefix}chunk_sizes", f"{prefix}lrs"
    if not isinstance(chunk_sizes, Sequence) or not isinstance(lrs, Sequence):
        raise ValueError(f"{cs} and {lr}: expected lists, one entry per level")
    if len(chunk_sizes) == 0 or len(chunk_sizes) != len(lrs):
        raise ValueError(
            f"{cs} ({len(chunk_sizes)} entries) and {lr} ({len(lrs)} entries) must have "
            "the same length >= 1: one chunk size and one inner learning rate per level"
        )
    for c in chunk_sizes:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{cs}: every entry must be an int >= 1, got {list(chunk_sizes)}")
    for r in lrs:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0:
            raise ValueError(f"{lr}: every entry must be a float >= 0, got {list(lrs)}")
    if variant == "nested" and any(a < b for a, b in itertools.pairwise(chunk_sizes)):
        raise ValueError(
            f"{cs}={list(chunk_sizes)}: the nested variant re-initialises level l+1 from "
            "level l, so levels go slowest first; give non-increasing chunk sizes, e.g. "
            f"{sorted(chunk_sizes, reverse=True)}"
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}momentum={momentum} must be in [0, 1)")


def check_block_options(mlp: str, norm: str, prefix: str = "") -> None:
    """ValueError naming a bad block kind (``mlp``) or norm kind, with the choices."""
    if mlp not in MLPS:
        raise ValueError(f"{prefix}mlp: unknown '{mlp}'; choose one of {', '.join(MLPS)}")
    if norm not in NORMS:
        raise ValueError(f"{prefix}norm: unknown '{norm}'; choose one of {', '.join(NORMS)}")


def _check_teacher(teacher: Teacher | None, x: torch.Tensor) -> None:
    if not isinstance(teacher, Teacher):
        raise ValueError(
            "the teach objective needs teacher=Teacher(error, tokens): the model passes the "
            "next-token error and the token ids (or use objective='local')"
        )
    if tuple(teacher.tokens.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"teacher.tokens: expected [B, T] = {list(x.shape[:2])}, "
            f"got {list(teacher.tokens.shape)}"
        )


def _sub_state(state: State, prefix: str) -> State:
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(
            f"state has no entries '{prefix}*' for this CMS level: a state from another model "
            "or configuration? Make one with init_state(batch_size)"
        )
    return sub
