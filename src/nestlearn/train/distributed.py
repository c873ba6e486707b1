"""Data parallelism under ``torchrun``: the process group, model wrapping, batch rows, reductions.

``train.parallel`` (docs/distributed.md) picks the mode:

- ``auto`` (default): ``ddp`` when launched by ``torchrun`` with ``WORLD_SIZE > 1``, else ``none``;
- ``none``: one process (the single-process trainer, unchanged);
- ``ddp``: ``DistributedDataParallel``, every rank holds the whole model and optimizer;
- ``fsdp``: FSDP2 (``fully_shard`` on each of ``model.blocks``, then the root), parameters,
  gradients and optimizer state are DTensors sharded on dim 0; on CUDA with bf16 precision the
  parameters are gathered in bf16 and gradients reduced in fp32 (``MixedPrecisionPolicy``).

``ddp``/``fsdp`` without ``torchrun`` (or with ``WORLD_SIZE=1``) run as one process with a
warning, so a sharded run resumes on a single process with the same config. ``none`` under
``torchrun`` with several ranks is refused: each rank would train its own copy into one folder.

Batch semantics: ``train.batch_size`` is the *global* micro-batch. The batch of step ``s`` is the
single-process batch (:func:`nestlearn.data.train_batch`, a pure function of the seed and step)
and rank ``r`` of ``W`` trains on its rows ``[r·B/W, (r+1)·B/W)``. Data-parallel gradients are
averaged over ranks, so the global mean loss and its gradient are the single-process ones for
any ``W``, and resuming on another world size continues the same data stream.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nestlearn.config.schema import TrainConfig
from nestlearn.errors import ConfigError, NestlearnWarning
from nestlearn.train.runtime import Runtime, setup_runtime

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: mode ``none``/``ddp``/``fsdp``, its rank and the world size."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share ``[r·n/W, (r+1)·n/W)`` of ``n`` rows (maybe empty)."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def all_reduce(self, values: Iterable[float], op: str = "sum") -> list[float]:
        """Sum (or ``max``) of each value over ranks, in float64; identity in one process."""
        values = [float(v) for v in values]
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (equal shares: the global mean of a per-rank mean)."""
        if self.world_size == 1:
            return value
        return self.all_reduce([value])[0] / self.world_size

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over ranks, so that every rank takes the same branch."""
        return tuple(v > 0 for v in self.all_reduce([float(f) for f in flags], op="max"))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` without."""
    try:
        return tuple(
            int(os.environ.get(k, d))
            for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
        )  # type: ignore[return-value]
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc


def resolve_parallel(parallel: str, world_size: int) -> str:
    """The effective mode for ``train.parallel`` at ``world_size`` (module docstring)."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel={parallel!r}; choose one of {', '.join(PARALLEL_MODES)}")
    if world_size <= 1:
        if parallel in ("ddp", "fsdp"):
            warnings.warn(
                f"train.parallel={parallel} but this is a single process (no torchrun, or "
                "WORLD_SIZE=1): training without data parallelism. Launch with `torchrun "
                "--nproc_per_node=N -m nestlearn train ...` to use N processes",
                NestlearnWarning,
                stacklevel=2,
            )
        return "none"
    if parallel == "none":
        raise ConfigError(
            f"train.parallel=none under torchrun with WORLD_SIZE={world_size}: every rank would "
            "train its own copy into the same folder; use train.parallel=ddp, fsdp or auto, or "
            "run without torchrun"
        )
    if not dist.is_available():
        raise ConfigError("train.parallel needs torch.distributed, which this torch build lacks")
    return "ddp" if parallel == "auto" else parallel


def setup_parallel(tc: TrainConfig) -> tuple[DistEnv, Runtime]:
    """Resolve the mode; under torchrun pick this rank's device and join the process group.

    The backend is nccl on CUDA and gloo on CPU. A process group that already exists (a caller
    initialised it) is used as is and left for the caller to destroy. ``fp16`` with ``fsdp`` is
    refused (its loss scaler would need ``ShardedGradScaler``); fp16 under ddp is supported.
    """
    if tc.parallel == "fsdp" and tc.precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 does not run with train.parallel=fsdp (its sharded gradients "
            "need a ShardedGradScaler, not wired in); use train.precision=bf16 (or fp32) with "
            "fsdp, or train.parallel=ddp with fp16"
        )
    _, world_size, local_rank = launch_env()
    mode = resolve_parallel(tc.parallel, world_size)
    if mode == "none":
        return DistEnv(), setup_runtime(tc)
    runtime = setup_runtime(tc, local_rank=local_rank)
    if tc.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is the global micro-batch and must be divisible "
            f"by the {world_size} ranks; use a multiple of {world_size}"
        )
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistEnv(mode, dist.get_rank(), dist.get_world_size(), local_rank, owns), runtime


# Matrix rules whose arithmetic DTensor cannot run on shards (an inner MLP or factors of plain
# tensors meet the sharded gradient): refused under FSDP, fine under DDP.
FSDP_UNSUPPORTED = {"dmgd": "its momentum MLP", "dgd": "its layer-input solve"}


def check_optimizer(mode: str, optim_name: str, preconditioner: str) -> None:
    """Refuse, before any work, a deep optimizer that cannot step FSDP-sharded matrices."""
    if mode != "fsdp":
        return
    reason = FSDP_UNSUPPORTED.get(optim_name)
    if optim_name == "preconditioned" and preconditioner == "kronecker":
        reason = "its Kronecker factors"
    if reason:
        raise ConfigError(
            f"optim.name={optim_name} does not run with train.parallel=fsdp ({reason} needs "
            "whole matrices); use train.parallel=ddp, or adamw, muon, m3, adam_memory, "
            "momentum, delta_momentum or diagonal preconditioned under fsdp"
        )


def wrap_model(model: nn.Module, env: DistEnv, runtime: Runtime) -> nn.Module:
    """The module to call for training: ``model`` itself (none, fsdp: sharded in place) or a
    ``DistributedDataParallel`` around it (ddp)."""
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if runtime.device.type == "cuda" and runtime.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, env: DistEnv, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a micro-batch that is not the last (grad accumulation)."""
    if enabled or env.world_size == 1:
        yield
    elif env.mode == "ddp":
        with module.no_sync():  # type: ignore[operator]
            yield
    else:
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm (``torch.nn.utils.clip_grad_norm_``'s numbers) of plain or
    FSDP-sharded (DTensor) gradients; return the norm before clipping.

    The norm of sharded gradients is reduced over ranks (``full_tensor``), so it is the norm of
    the whole gradient, the single-process value. The trainer's one clipping path, every mode.
    """
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(total, DTensor):
            total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
