"""Levels: every learning component of a model with its objective, optimizer and frequency.

Nested Learning (SPEC §1) reads a model as nested optimization problems. Each component is an
associative memory with a context flow, an inner objective, an inner optimizer and an update
frequency; components are ordered into levels by frequency (faster = updated more often). Layers
describe their inner memories with ``inner_levels()``; :func:`model_levels` adds the outer level
(all meta-parameters, trained by the outer optimizer once per step) and sorts them fastest
first; :func:`levels_rows` numbers them for a table, level 1 the slowest.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Level:
    """One learning component."""

    component: str  # module path, e.g. "blocks.0.mixer.memory"
    memory: str  # what is learned, e.g. "matrix [Dk x Dv] per head"
    objective: str  # inner objective, e.g. "l2: ½‖M k − v‖²"
    optimizer: str  # e.g. "GD, retention α_t (Gated DeltaNet)"
    update_every: int | None  # tokens between updates; None = once per outer optimizer step

    @property
    def frequency(self) -> str:
        if self.update_every is None:
            return "1 / optimizer step"
        return "1 / token" if self.update_every == 1 else f"1 / {self.update_every} tokens"


def model_levels(model: nn.Module, outer_optimizer: str = "AdamW") -> list[Level]:
    """The inner levels of every submodule (fastest first), then the outer level."""
    inner: list[Level] = []
    for name, module in model.named_modules():
        describe = getattr(module, "inner_levels", None)
        if describe is None or module is model:
            continue
        for level in describe():
            path = f"{name}.{level.component}" if level.component else name
            inner.append(
                Level(path, level.memory, level.objective, level.optimizer, level.update_every)
            )
    inner.sort(key=lambda lv: lv.update_every if lv.update_every is not None else 1 << 62)
    outer = Level(
        "(all parameters)",
        "projections, gates, initial memory states, MLPs",
        "next-token cross-entropy",
        outer_optimizer,
        None,
    )
    return [*inner, outer]


def levels_rows(levels: list[Level]) -> list[list[str]]:
    """Rows for a markdown table, slowest level first: level number, component, description.

    Level 1 is the slowest (the outer level, once per optimizer step) and the number grows with
    the frequency, as CMS levels are configured (``cms_chunk_sizes`` slowest first): a model's
    ``cms.levels.0, cms.levels.1, ...`` get increasing level numbers in config order. Components
    with one frequency share a level and keep their order in ``levels``."""

    def period(lv: Level) -> int:
        return lv.update_every if lv.update_every is not None else 1 << 62

    rank = {p: i + 1 for i, p in enumerate(sorted({period(lv) for lv in levels}, reverse=True))}
    ordered = sorted(levels, key=lambda lv: rank[period(lv)])
    return [
        [
            str(rank[period(lv)]),
            lv.component,
            lv.memory,
            lv.objective,
            lv.optimizer,
            lv.frequency,
        ]
        for lv in ordered
    ]


LEVEL_HEADERS = ["level", "component", "memory", "objective", "optimizer", "frequency"]
