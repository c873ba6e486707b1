"""Fault injection for crash-safety tests: ``NESTLEARN_FAULT=<point>@<step>``.

At the named point of the named step the process kills itself with SIGKILL, exactly as an
out-of-memory killer or a pre-empted machine would. Points: ``after_checkpoint`` (a checkpoint was
fully written), ``during_checkpoint`` (some checkpoint files are written, the rename is not done).
Unset (the default), this costs one environment lookup per checkpoint.
"""

from __future__ import annotations

import os
import signal

ENV = "NESTLEARN_FAULT"


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get(ENV, "")
    if spec and spec == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
