"""Matrix memories (SPEC §2.2, rows 1–4): linear attention, gated linear attention, DeltaNet and
Gated DeltaNet, one op ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` (dot objective:
without the ``k kᵀ`` term).

- :mod:`.forms`: the three forms of SPEC §2.3 under one signature: the reference (a loop over
  tokens), the chunk form's entry point, the one-token step, and the dispatch.
- :mod:`.chunk`: the chunk form's algorithm: intra-chunk products, the inter-chunk state pass,
  the delta rule's UT transform (``(I + L)⁻¹``) and its hand-written backwards.
- :mod:`.fla_kernels`: the same recurrences on CUDA with flash-linear-attention's kernels.
"""
