"""Fault injection for crash-safety tests: ``NESTLEARN_FAULT=<point>@<step>`` or ``count@<k>``.

At the named point of the named step the process kills itself with SIGKILL, exactly as an
out-of-memory killer or a pre-empted machine would; ``count@k`` kills it at the k-th fault point
it reaches (any point, any step: a reproducible "random" moment). Points, in the order a
checkpointing step reaches them:

- ``after_step``: an optimizer step is done (before its metrics row and any checkpoint);
- ``during_checkpoint``: some checkpoint files are written into the temp folder;
- ``replacing_checkpoint``: re-writing an existing step, the old folder is renamed aside and the
  new one is not in place yet;
- ``before_publish``: the new checkpoint folder is in place, ``latest`` still names the previous;
- ``before_prune``: ``latest`` names the new checkpoint, older ones are not pruned yet;
- ``after_checkpoint``: a checkpoint was fully written and older ones pruned.

Unset (the default), this costs one environment lookup per point.
"""

from __future__ import annotations

import os
import signal

ENV = "NESTLEARN_FAULT"
_reached = 0  # fault points reached by this process (for ``count@k``)


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process if ``NESTLEARN_FAULT`` names this point and step (or this count)."""
    global _reached
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    _reached += 1
    if spec == f"{point}@{step}" or spec == f"count@{_reached}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows: terminate
