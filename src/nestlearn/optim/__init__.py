"""Deep optimizers (SPEC §3): the outer level of the update rules of :mod:`nestlearn.memory`.

Each optimizer is a ``torch.optim.Optimizer`` whose update is built from
:mod:`nestlearn.memory.core.rules` (momentum, retention, objectives, the DGD projection); the maths,
what is the paper's and what is ours, 1-D fallbacks and memory costs are in
``docs/optimizers.md``.

- :class:`MomentumMemory` (NL-17/18), :class:`PreconditionedMomentum` (NL-19/20),
  :class:`DeltaMomentum` (NL-21/22), :class:`DeepMomentum` (DMGD, NL-23),
  :class:`NonlinearMomentum` / :class:`Muon` (NL-24), :class:`DeltaGD` (NL-27..29),
  :class:`M3` (multi-scale momentum Muon), :class:`AdamMemory` (Adam as a memory);
- :func:`hybrid` / :class:`HybridOptimizer`: matrices to one of them, the rest to AdamW.
"""

from nestlearn.optim.adam import AdamMemory
from nestlearn.optim.base import MemoryOptimizer
from nestlearn.optim.deep_momentum import DeepMomentum
from nestlearn.optim.delta_momentum import DeltaMomentum
from nestlearn.optim.dgd import DeltaGD
from nestlearn.optim.hybrid import HybridOptimizer, hybrid, split_parameters
from nestlearn.optim.m3 import M3
from nestlearn.optim.momentum import MomentumMemory
from nestlearn.optim.newton_schulz import newton_schulz
from nestlearn.optim.nonlinear import Muon, NonlinearMomentum
from nestlearn.optim.preconditioned import PreconditionedMomentum
from nestlearn.optim.preconditioners import DiagonalSecondMoment, Identity, Kronecker

__all__ = [
    "M3",
    "AdamMemory",
    "DeepMomentum",
    "DeltaGD",
    "DeltaMomentum",
    "DiagonalSecondMoment",
    "HybridOptimizer",
    "Identity",
    "Kronecker",
    "MemoryOptimizer",
    "MomentumMemory",
    "Muon",
    "NonlinearMomentum",
    "PreconditionedMomentum",
    "hybrid",
    "newton_schulz",
    "split_parameters",
]
