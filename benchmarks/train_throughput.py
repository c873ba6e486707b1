"""Training throughput and model FLOP utilization (MFU), both measured in the same run.

    python benchmarks/train_throughput.py [CONFIG] [section.key=value ...] [--steps N] [--json F]

Peak: the best FLOP/s of a square dense matmul (n=2048, the training dtype) on the same device,
timed just before the model. Model FLOPs per token: ``model.flops_per_token(seq_len)`` (forward +
backward, PaLM-style count). MFU = tokens/s x FLOPs/token / peak. Random tokens stand in for data
(throughput does not depend on token values), so no corpus or tokenizer is prepared.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.models.registry import build_model
from nestlearn.models.summary import count_parameters
from nestlearn.train.optim import build_optimizer
from nestlearn.train.runtime import setup_runtime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_tokens_per_s(cfg, steps: int, warmup: int):
    runtime = setup_runtime(cfg.train)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(runtime.device)
    optimizer = build_optimizer(model, cfg.optim)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=runtime.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    elapsed = 0.0
    for i in range(warmup + steps):
        _sync(runtime.device)
        start = time.perf_counter()
        with runtime.autocast():
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(runtime.device)
        if i >= warmup:
            elapsed += time.perf_counter() - start
    return steps * B * T / elapsed, model.flops_per_token(T), count_parameters(model), runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="tiny")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    runtime = setup_runtime(cfg.train)
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    peak = matmul_peak_flops(runtime.device, dtype)
    tps, flops_per_token, n_params, runtime = train_tokens_per_s(cfg, args.steps, args.warmup)
    result = {
        "config": cfg.name,
        "model": cfg.model.name,
        "params": n_params,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "train_tokens_per_s": round(tps, 1),
        "model_flops_per_token": flops_per_token,
        "matmul_peak_flops": round(peak),
        "mfu": round(tps * flops_per_token / peak, 4),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
