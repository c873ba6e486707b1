"""One model's training-step measurement, for ``nestlearn bench train`` (``train_throughput.py``).

    python benchmarks/_train_worker.py '{"config": "tiny", "overrides": [...], "steps": 10, ...}'

Prints one JSON line. The parent runs each model in a fresh process so that the CPU peak-memory
figure belongs to that model alone. What is measured:

- **step time**: one full optimizer step as the trainer takes it (forward under the run's
  autocast, float32 cross-entropy, backward, gradient clipping, optimizer step), on random tokens
  (throughput does not depend on token values). CUDA is synchronized before and after each step.
  Every timed step (after ``warmup`` untimed ones) is reported; the parent takes the median.
- **peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` since before the model was built
  (parameters, gradients, optimizer state, activations; the caching allocator's slack excluded).
  CPU: growth of the process's peak resident set size (``getrusage`` ``ru_maxrss``) over the
  resident size measured after imports, before the model is built: the same tensors plus the
  allocator's and the libraries' working memory, as the OS sees it.
- **FLOPs per token**: the model's own count (``model.flops_per_token(T)``, forward + backward,
  PaLM-style) and, on one extra step, the count of :class:`torch.utils.flop_counter.
  FlopCounterMode` (every matmul, batched matmul, convolution and attention kernel dispatched
  forward and backward, divided by ``B·T``; elementwise work is not counted by either).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch

import nestlearn.models  # noqa: F401  (registers every architecture before the memory baseline)
from nestlearn.config import load_config
from nestlearn.models.registry import build_model
from nestlearn.models.summary import count_parameters
from nestlearn.train.activation_checkpointing import apply_activation_checkpointing
from nestlearn.train.compile import maybe_compile
from nestlearn.train.optim import build_optimizer
from nestlearn.train.runtime import setup_runtime
from nestlearn.train.step_cost import random_token_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_now() -> int:
    """Current resident set size in bytes (``/proc/self/statm``; peak RSS where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_peak()


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _warm_up_libraries(optim_cfg) -> None:
    """One step of a 2-layer toy model with the run's optimizer, so that the memory baseline
    includes what every model pays for (lazily imported modules, BLAS and autograd thread pools,
    code pages): the figure is then the model's own."""
    toy = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    optimizer = build_optimizer(toy, optim_cfg)
    toy(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()


def flop_counter():
    """``FlopCounterMode`` that also counts the CPU flash-attention kernels, which torch's table
    leaves out (torch counts the CUDA ones): full ``T×T`` scores, no causal halving, as torch
    counts SDPA on CUDA and as the models' ``flops_per_token`` do."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten, custom = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return fc.FlopCounterMode(display=False, custom_mapping=custom)


def resolved_config(name: str, overrides: list[str]):
    """The run config, ``vocab_size`` filled in as the trainer would (257 bytes or the BPE's)."""
    cfg = load_config(name, overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    return cfg


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec["steps"]`` training steps of ``spec["config"]`` (+ overrides); see the module
    docstring for what each field means."""
    cfg = resolved_config(spec["config"], list(spec.get("overrides", [])))
    runtime = setup_runtime(cfg.train)
    _warm_up_libraries(cfg.optim)
    rss_base = _rss_now()
    device = runtime.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_base = torch.cuda.memory_allocated(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    maybe_compile(model, cfg.train.compile, cfg.train.compile_mode)
    step = random_token_step(model, build_optimizer(model, cfg.optim), runtime, cfg)
    B, T = cfg.train.batch_size, cfg.train.seq_len

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise RuntimeError(f"{spec['config']}: non-finite loss {loss} at bench step {i}")
    if device.type == "cuda":
        peak, memory_kind = torch.cuda.max_memory_allocated(device) - mem_base, "cuda_allocated"
    else:
        peak, memory_kind = max(0, _rss_peak() - rss_base), "cpu_peak_rss_delta"
    counted = None
    if spec.get("count_flops", True):
        with flop_counter() as counter:
            step()
        counted = counter.get_total_flops() / (B * T)
    median = statistics.median(times)
    return {
        "config": spec["config"],
        "overrides": list(spec.get("overrides", [])),
        "model": cfg.model.name,
        "params": count_parameters(model),
        "vocab_size": cfg.model.vocab_size,
        "device": str(device),
        "precision": runtime.precision,
        "threads": torch.get_num_threads(),
        "batch_size": B,
        "seq_len": T,
        "step_times_s": [round(t, 6) for t in times],
        "step_s": round(median, 6),
        "tokens_per_s": round(B * T / median, 1),
        "peak_memory_bytes": int(peak),
        "memory_kind": memory_kind,
        "flops_per_token": float(model.flops_per_token(T)),
        "counted_flops_per_token": counted,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: _train_worker.py SPEC_JSON (run by `nestlearn bench train`)")
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    main()
