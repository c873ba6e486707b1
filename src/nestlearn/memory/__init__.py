"""The associative-memory engine: one functional core of update rules, three forms per memory.

- :mod:`~nestlearn.memory.core`: S-1 per token (objectives, momentum, retention, DGD projection)
  and the segment products of the chunk forms (SPEC §2.1).
- :mod:`~nestlearn.memory.matrix`: linear attention, GLA, DeltaNet, Gated DeltaNet as one op.
- :mod:`~nestlearn.memory.mlp`: Titans' MLP memory trained by chunked gradient descent.
- :mod:`~nestlearn.memory.dgd`, :mod:`~nestlearn.memory.self_modifying`: self-modifying
  Titans (MLP memories written by delta gradient descent; ``docs/self-modifying-titans.md``).
- :mod:`~nestlearn.memory.cms`: the Continuum Memory System's levels (``docs/cms.md``).

Each op has a sequential reference, a chunkwise-parallel form and a one-token step with the same
signature (``forms.py`` in each folder); this folder's README maps every file to the SPEC and
derives the chunk forms.
"""

from nestlearn.memory.core.rules import get_objective
from nestlearn.memory.dgd.forms import (
    dgd_mlp_memory_chunk,
    dgd_mlp_memory_reference,
    dgd_mlp_memory_step,
)
from nestlearn.memory.matrix.forms import (
    matrix_memory,
    matrix_memory_chunk,
    matrix_memory_reference,
    matrix_memory_step,
)
from nestlearn.memory.mlp.forms import (
    init_mlp_memory_state,
    mlp_memory_chunk,
    mlp_memory_reference,
    mlp_memory_step,
)
from nestlearn.memory.self_modifying import (
    SelfModifyingOptions,
    SelfModifyingParams,
    init_self_modifying_state,
    self_modifying_chunk,
    self_modifying_reference,
    self_modifying_step,
)

__all__ = [
    "SelfModifyingOptions",
    "SelfModifyingParams",
    "dgd_mlp_memory_chunk",
    "dgd_mlp_memory_reference",
    "dgd_mlp_memory_step",
    "get_objective",
    "init_mlp_memory_state",
    "init_self_modifying_state",
    "matrix_memory",
    "matrix_memory_chunk",
    "matrix_memory_reference",
    "matrix_memory_step",
    "mlp_memory_chunk",
    "mlp_memory_reference",
    "mlp_memory_step",
    "self_modifying_chunk",
    "self_modifying_reference",
    "self_modifying_step",
]
