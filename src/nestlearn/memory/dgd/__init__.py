"""The memories of self-modifying Titans (SPEC §5): MLP memories written by chunked *delta*
gradient descent, ``W_t = W_{t-1} (α_t I − η_t x_t x_tᵀ) + S_t``, with momentum, per-token reads.

- :mod:`.forms`: one DGD MLP memory in the three forms under one signature: the reference (a
  loop over tokens), the chunk form (a UT transform per linear map, per segment), the one-token
  step; the segment machinery the bank reuses.
- :mod:`.bank`: the other memories (``M_k, M_v, M_q, M_η, M_α``) written together, as one bank,
  segment by segment (the reference formulation under autograd: ``bank.segment_autograd``).
- :mod:`.bank_layout`: which memories a bank holds, and the packing of their weights.
- :mod:`.bank_fused`: one bank segment's write and its reads as autograd nodes with hand-written
  backwards (σ'' of the surprise included).
- :mod:`.write`: the DGD write of one linear map over a segment, forward and hand-written
  backward, plain tensor maths.
- :mod:`.gates`: the write's coefficients from the gates ``η, μ, α``, with a hand-written backward.

The whole computation over all memories is :mod:`nestlearn.memory.self_modifying`.
"""
