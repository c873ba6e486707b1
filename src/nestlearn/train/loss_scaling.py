"""fp16 loss scaling (``train.precision=fp16``): a ``torch.amp.GradScaler`` for the run.

float16 keeps 5 exponent bits, so small gradients underflow to zero. The loss is multiplied by a
scale ``S`` before the backward (every gradient is then ``S`` times the true one), and the
gradients are divided by ``S`` (``unscale_``) before anything reads them: clipping,
``train.level_periods`` and the optimizers, deep ones included, see true gradients. A step whose
gradients hold inf/nan is skipped: no parameter, optimizer, schedule or level-period state moves,
``S`` is halved (``backoff_factor``) and the trainer retries the same batch; after
``growth_interval`` clean steps ``S`` doubles. This is torch's AMP recipe
(https://pytorch.org/docs/stable/amp.html#gradient-scaling), with the schedule advanced only by
applied steps. bf16 and fp32 have float32's exponent range and need no scaler (``None``).
"""

from __future__ import annotations

import torch

# Below this scale an overflowing gradient is not a scaling problem: the true gradient is
# non-finite (or within a factor 2 of float16's maximum), so the trainer stops with an error.
MIN_SCALE = 1.0


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A scaler on ``device``'s type for ``precision == "fp16"``, else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
