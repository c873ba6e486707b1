"""Titans' neural long-term memory (SPEC §2.2, the MLP row): an MLP memory written by chunked
gradient descent with momentum and retention (SPEC §2.3, deep memories).

- :mod:`.forms`: the three forms under one signature: the reference (a loop over tokens), the
  chunk form's entry point, the one-token step; the state.
- :mod:`.chunk`: the chunk form over a whole call as one autograd node: segments of a chunk,
  the forward loop and the hand-written backward loop.
- :mod:`.segment`: one segment's pieces (gate coefficients, surprise, dual-form reads, end of
  segment), each with its hand-written backward.
"""
