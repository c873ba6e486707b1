"""Several outer levels in one optimizer: parameters stepped every p optimizer steps (SPEC §4).

"Across steps", CMS level l's meta-parameters are updated by the outer optimizer every ``C(l)``
optimizer steps with the gradient accumulated over those steps. :class:`LevelSteps` does this
for any optimizer: after the backward (and the gradient clipping) of optimizer step ``s``
(0-based), each parameter of period ``p > 1`` adds its gradient to an accumulator; when
``(s + 1) % p == 0`` the accumulated sum is released into ``.grad`` and the accumulator restarts,
otherwise ``.grad`` is set to ``None``. Optimizers skip parameters whose ``.grad`` is None, so
between releases such a parameter is untouched — no AdamW weight decay, no momentum drift — and
its AdamW step count (bias correction) counts its own updates only. A zero gradient would not
do: decay and momentum would still move it.

Periods come from ``train.level_periods`` (:meth:`LevelSteps.from_spec`): comma-separated entries,
``cms`` (every module with ``outer_periods()``, e.g. each CMS level l at ``C(l)``) and
``glob=p`` (parameter names matched with :func:`fnmatch.fnmatch`; later entries win).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from nestlearn.errors import ConfigError


class LevelSteps:
    """Gradient accumulation per parameter with its own period; ``periods`` maps parameter
    names of ``model`` to periods ``p >= 1`` (``p = 1``: every step, not tracked)."""

    def __init__(self, model: nn.Module, periods: dict[str, int]) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(periods) - set(params))
        if unknown:
            raise ValueError(f"level periods name unknown parameters: {unknown[:3]}")
        for name, p in periods.items():
            if isinstance(p, bool) or not isinstance(p, int) or p < 1:
                raise ValueError(f"level period of {name}: expected an int >= 1, got {p!r}")
        self.periods = {name: p for name, p in sorted(periods.items()) if p > 1}
        self.params = {name: params[name] for name in self.periods}
        self.accumulators = {
            name: torch.zeros_like(param, memory_format=torch.preserve_format)
            for name, param in self.params.items()
        }

    @classmethod
    def from_spec(cls, model: nn.Module, spec: str) -> LevelSteps | None:
        """``""`` -> None (off); otherwise the periods the spec assigns (module docstring)."""
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        if not entries:
            return None
        names = [name for name, _ in model.named_parameters()]
        periods: dict[str, int] = {}
        for entry in entries:
            if entry == "cms":
                found = _outer_periods(model)
                if not found:
                    raise ConfigError(
                        "train.level_periods=cms: the model has no CMS (no module with "
                        "outer_periods()); use glob=period entries instead"
                    )
                periods.update(found)
                continue
            pattern, sep, raw = entry.rpartition("=")
            try:
                period = int(raw)
            except ValueError:
                period = 0
            if not sep or not pattern or period < 1:
                raise ConfigError(
                    f"train.level_periods entry '{entry}': expected 'cms' or 'glob=period' with "
                    "an int period >= 1, e.g. 'blocks.*.cms.levels.1.*=4'"
                )
            matched = [n for n in names if fnmatch.fnmatch(n, pattern)]
            if not matched:
                raise ConfigError(
                    f"train.level_periods entry '{entry}' matches no parameter; names look like "
                    f"{names[:3]}"
                )
            periods.update(dict.fromkeys(matched, period))
        return cls(model, periods)

    @torch.no_grad()
    def apply(self, step: int) -> None:
        """Call after backward (and clipping), before ``optimizer.step()`` of step ``step``
        (0-based): accumulate, then release the sum or hide the gradient (``None``)."""
        for name, param in self.params.items():
            acc = self.accumulators[name]
            if param.grad is not None:
                acc.add_(param.grad)
            if (step + 1) % self.periods[name] == 0:
                param.grad = acc.clone()
                acc.zero_()
            else:
                param.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators by parameter name (tensors only: ``weights_only`` loadable)."""
        return {name: acc.clone() for name, acc in self.accumulators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.accumulators):
            raise ValueError(
                f"level-steps state holds {sorted(state)[:3]}..., expected the accumulators of "
                f"{sorted(self.accumulators)[:3]}...: train.level_periods changed since the "
                "checkpoint was written"
            )
        for name, value in state.items():
            self.accumulators[name].copy_(value)


def _outer_periods(model: nn.Module) -> dict[str, int]:
    periods: dict[str, int] = {}
    for prefix, module in model.named_modules():
        describe = getattr(module, "outer_periods", None)
        if describe is None:
            continue
        for name, period in describe().items():
            periods[f"{prefix}.{name}" if prefix else name] = period
    return periods
