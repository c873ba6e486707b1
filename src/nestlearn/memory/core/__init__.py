"""The functional core every memory composes (SPEC §2.1).

- :mod:`.rules`: S-1 per token: objectives (dot, L2, Huber) and their errors, the linear
  gradient ``δ uᵀ``, momentum, retention, the DGD projection.
- :mod:`.segments`: segment products ``Π a_r`` of per-token gates, without division, that the
  chunk forms (SPEC §2.3) unroll their linear recurrences with.
- :mod:`.precision`: memory ops compute in float32 under autocast or on 16-bit inputs.
"""
