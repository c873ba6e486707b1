"""Run under ``torchrun``: Muon-like optimizers on FSDP2-sharded matrices, fed fixed gradients.

``python -m torch.distributed.run --standalone --nproc_per_node=2 dist_worker.py OUT`` writes the
gathered parameters after each step to ``OUT`` (rank 0) for the test to compare with one process.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

# Row counts that do not divide by 2 ranks: shards of unequal size.
SHAPES = [(5, 4), (7, 5), (3, 7)]
STEPS = 3


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in SHAPES))


def gradients(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def optimizers(params: list[nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    from nestlearn.optim import M3, Muon

    half = len(params) // 2
    return {
        "muon": Muon(params[:half] or params, lr=0.02, weight_decay=0.1),
        "m3": M3(params[half:], lr=0.01, frequency=2, weight_decay=0.1),
    }


def run(sharded: bool) -> list[list[torch.Tensor]]:
    """Parameters (whole) after each step; sharded: FSDP2 over the current process group."""
    from nestlearn.optim.newton_schulz import shard_like

    model = build()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    params = list(model.parameters())
    opts = optimizers(params)
    history = []
    for step in range(STEPS):
        for p, g in zip(params, gradients(step), strict=True):
            p.grad = shard_like(g, p) if sharded else g
        for opt in opts.values():
            opt.step()
        history.append([(p.full_tensor() if sharded else p).detach().clone() for p in params])
    return history


def main() -> None:
    dist.init_process_group("gloo")
    history = run(sharded=True)
    if dist.get_rank() == 0:
        torch.save(history, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
