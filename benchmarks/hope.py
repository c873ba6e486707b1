"""Self-modifying Titans (HOPE's sequence mixer) against PyPI ``nested-learning==0.2.0``.

    nestlearn bench hope [--json FILE] [--seq-len 512] [--repeats 3] [--threads N]
                         [--clock wall|cpu] [--autograd-bank] [--device cpu|cuda]

Ours: forward + backward tokens/s of :class:`~nestlearn.layers.self_modifying.
SelfModifyingTitansMixer` (gradients into every meta-parameter through the inner updates) at
B=1, T=512, d=256, 4 heads of 64, chunk 64 for ``M_mem`` and 16 (SPEC default) or 8 for the
other memories, float32 on the CPU. Theirs: the forward-only, no-grad update pass of
``nested_learning.titan.self_modifying.SelfModifyingTitans.forward_with_updates`` (its default
settings, ``dim=256``, the same chunk sizes), optional: ``pip install nested-learning==0.2.0
--no-deps`` (that module imports only torch). Each entry is timed after one warm-up call, best
of ``--repeats``, in turns (a, b, a, b, ...) so that a burst of load on a shared machine hits all
of them alike. The issue's target: ours with gradients >= 10x theirs. ``--autograd-bank`` also
times ours with the other memories' segments (reads, coefficients, writes) through plain
autograd (``fused_bank=False``, the formulation before ``memory/dgd/bank_fused.py``), in the same
turns. ``--device cuda`` runs every entry on the GPU (float32; each timed call ends with a CUDA
synchronize).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

import torch

from nestlearn.layers.self_modifying import SelfModifyingTitansMixer
from nestlearn.train.report import markdown_table
from nestlearn.utils.timing import best_in_turns

D_MODEL, HEADS, MEMORY_CHUNK = 256, 4, 64
OTHER_CHUNKS = (16, 8)


def _sync(x: torch.Tensor) -> None:
    """Wait for the GPU (CUDA runs asynchronously) so that a timed call is a finished one."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def ours(x: torch.Tensor, other_chunk: int, fused_bank: bool = True) -> Callable[[], None]:
    torch.manual_seed(0)
    layer = SelfModifyingTitansMixer(
        D_MODEL, HEADS, D_MODEL // HEADS, chunk_size=MEMORY_CHUNK, other_chunk_size=other_chunk
    ).to(x.device)
    layer.options = dataclasses.replace(layer.options, fused_bank=fused_bank)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x)[0].sum().backward()
        _sync(x)

    return step


def theirs(x: torch.Tensor, other_chunk: int) -> Callable[[], None] | None:
    try:
        from nested_learning.titan.self_modifying import (
            SelfModifyingTitans,
            SelfModifyingTitansConfig,
        )
    except ImportError:
        return None
    torch.manual_seed(0)
    config = SelfModifyingTitansConfig(
        dim=D_MODEL, chunk_size_other=other_chunk, chunk_size_memory=MEMORY_CHUNK
    )
    module = SelfModifyingTitans(config).to(x.device)

    def step() -> None:
        with torch.no_grad():
            module.forward_with_updates(x, module.init_fast_state())
        _sync(x)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nestlearn bench hope", description=__doc__)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument(
        "--autograd-bank",
        action="store_true",
        help="also time ours with plain autograd through the other memories' segments",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    x = torch.randn(1, args.seq_len, D_MODEL).to(args.device)
    steps: dict[str, Callable[[], None]] = {}
    installed = True
    for chunk in OTHER_CHUNKS:
        steps[f"ours/{chunk}"] = ours(x, chunk)
        if args.autograd_bank:
            steps[f"autograd/{chunk}"] = ours(x, chunk, fused_bank=False)
        step = theirs(x, chunk)
        installed = step is not None
        if step is not None:
            steps[f"theirs/{chunk}"] = step
    times = best_in_turns(steps, args.repeats, args.clock)
    rows, results = [], []
    for chunk in OTHER_CHUNKS:
        row = {
            "other_chunk": chunk,
            "memory_chunk": MEMORY_CHUNK,
            "ours_fwd_bwd_tokens_per_s": args.seq_len / times[f"ours/{chunk}"],
        }
        if installed:
            row["theirs_fwd_no_grad_tokens_per_s"] = args.seq_len / times[f"theirs/{chunk}"]
            row["ratio"] = times[f"theirs/{chunk}"] / times[f"ours/{chunk}"]
        if args.autograd_bank:
            row["ours_autograd_bank_tokens_per_s"] = args.seq_len / times[f"autograd/{chunk}"]
        results.append(row)
        rows.append(
            [
                f"{chunk} / {MEMORY_CHUNK}",
                row["ours_fwd_bwd_tokens_per_s"],
                *([row["ours_autograd_bank_tokens_per_s"]] if args.autograd_bank else []),
                row.get("theirs_fwd_no_grad_tokens_per_s", "-"),
                f"x{row['ratio']:.1f}" if installed else "-",
            ]
        )
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "shape": {"batch": 1, "seq_len": args.seq_len, "d_model": D_MODEL, "heads": HEADS},
        "results": results,
    }
    if not installed:
        result["nested_learning"] = "not installed: pip install nested-learning==0.2.0 --no-deps"
    headers = ["chunks (others / mem)", "ours fwd+bwd tok/s"]
    headers += ["ours, autograd bank"] if args.autograd_bank else []
    headers += ["theirs fwd tok/s", "ratio"]
    print(markdown_table(headers, rows))
    if not installed:
        print(result["nested_learning"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
