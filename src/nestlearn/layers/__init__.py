"""Building blocks shared by the language models: norms, position embeddings, attention, MLPs."""

from nestlearn.layers.attention import CausalSelfAttention
from nestlearn.layers.mlp import SwiGLU
from nestlearn.layers.norm import RMSNorm
from nestlearn.layers.rope import apply_rope, rope_tables, rotate_half

__all__ = ["CausalSelfAttention", "RMSNorm", "SwiGLU", "apply_rope", "rope_tables", "rotate_half"]
