"""Chunkwise vs sequential memory layers, and Titans' memory against titans-pytorch.

    nestlearn bench memory [--json FILE] [--seq-len 2048] [--repeats 3] [--threads N]
                           [--layers titans_lmm,...]

Part 1 (issue: chunkwise >= 20x sequential): for every memory layer, forward + backward tokens/s
of the chunkwise and sequential (reference) forms, measured side by side in this run, at B=2,
T=2048, d=256, 4 heads of 64, chunk 64, float32 on the CPU, and the max abs difference of their
outputs. Part 2 (issue: >= 2x titans-pytorch): our Titans neural memory layer against
``titans_pytorch.NeuralMemory`` (optional: ``pip install 'nestlearn[bench]'``) at B=2, T=1024,
dim 256, 4 heads of 64, chunk 64, with the same memory MLP on both sides (64 -> 128 -> 64, our
default, and 64 -> 256 -> 64, theirs). Best of ``--repeats`` timings each, taken in turns
(machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from nestlearn.layers.matrix_memory import VARIANTS, MatrixMemoryMixer
from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.train.report import markdown_table

LAYERS = [*VARIANTS, "titans_lmm"]


def build_layer(name: str, mode: str, d_model: int, heads: int, chunk: int) -> torch.nn.Module:
    head_dim = d_model // heads
    if name == "titans_lmm":
        return NeuralMemoryMixer(d_model, heads, head_dim, chunk_size=chunk, mode=mode)
    return MatrixMemoryMixer(name, d_model, heads, head_dim, chunk_size=chunk, mode=mode)


def time_fwd_bwd(steps: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Best wall time of one forward + backward per entry, after one warm-up call each.

    Entries are timed in turns (a, b, a, b, ...) so that a burst of load on a shared machine
    hits all of them alike rather than one.
    """
    for step in steps.values():
        step().sum().backward()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step().sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def chunk_vs_sequential(seq_len: int, repeats: int, layers: list[str] = LAYERS) -> list[dict]:
    B, d, heads, chunk = 2, 256, 4, 64
    rows = []
    for name in layers:
        torch.manual_seed(0)
        chunked = build_layer(name, "chunk", d, heads, chunk)
        sequential = build_layer(name, "reference", d, heads, chunk)
        sequential.load_state_dict(chunked.state_dict())
        x = torch.randn(B, seq_len, d)
        with torch.no_grad():
            diff = (chunked(x)[0] - sequential(x)[0]).abs().max().item()
        times = time_fwd_bwd(
            {"chunk": lambda m=chunked, x=x: m(x)[0], "seq": lambda m=sequential, x=x: m(x)[0]},
            repeats,
        )
        t_chunk, t_seq = times["chunk"], times["seq"]
        tokens = B * seq_len
        rows.append(
            {
                "layer": name,
                "chunk_tokens_per_s": tokens / t_chunk,
                "sequential_tokens_per_s": tokens / t_seq,
                "speedup": t_seq / t_chunk,
                "max_abs_diff": diff,
            }
        )
        print(
            f"{name}: chunk {tokens / t_chunk:,.0f} tok/s, sequential {tokens / t_seq:,.0f} "
            f"tok/s, x{t_seq / t_chunk:.1f}, max |diff| {diff:.2e}",
            flush=True,
        )
    return rows


def against_titans_pytorch(repeats: int, expansion: int = 2) -> dict:
    """Both memories with the same MLP: 2 layers, ``head_dim -> expansion·head_dim -> head_dim``
    (ours ``hidden_mult``, theirs ``default_model_kwargs["expansion_factor"]``; their default is
    4, ours 2: the report gives both, each with the other side matched to it)."""
    B, T, d, heads, chunk = 2, 1024, 256, 4, 64
    torch.manual_seed(0)
    x = torch.randn(B, T, d)
    ours = NeuralMemoryMixer(d, heads, d // heads, chunk_size=chunk, hidden_mult=expansion)
    steps = {"ours": lambda: ours(x)[0]}
    try:
        from titans_pytorch import NeuralMemory
    except ImportError:
        NeuralMemory = None
    if NeuralMemory is not None:
        theirs = NeuralMemory(
            dim=d,
            chunk_size=chunk,
            heads=heads,
            dim_head=d // heads,
            default_model_kwargs={"depth": 2, "expansion_factor": float(expansion)},
        )
        steps["theirs"] = lambda: theirs(x)[0]
    times = time_fwd_bwd(steps, repeats)
    t_ours = times["ours"]
    result = {
        "shape": {"batch": B, "seq_len": T, "dim": d, "heads": heads, "chunk": chunk},
        "memory_mlp": f"{d // heads} -> {expansion * d // heads} -> {d // heads}",
        "ours_tokens_per_s": B * T / t_ours,
    }
    if NeuralMemory is None:
        result["titans_pytorch"] = "not installed: pip install 'nestlearn[bench]'"
        return result
    t_theirs = times["theirs"]
    result.update({"titans_pytorch_tokens_per_s": B * T / t_theirs, "ratio": t_theirs / t_ours})
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nestlearn bench memory", description=__doc__)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--layers", default=",".join(LAYERS), help=f"comma-separated subset of {LAYERS}"
    )
    args = parser.parse_args(argv)
    layers = [name for name in args.layers.split(",") if name]
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown:
        parser.error(f"--layers: unknown {unknown}; choose from {LAYERS}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "chunk_vs_sequential": chunk_vs_sequential(args.seq_len, args.repeats, layers),
        "titans": [against_titans_pytorch(args.repeats, e) for e in (2, 4)],
    }
    rows = [
        [
            r["layer"],
            r["chunk_tokens_per_s"],
            r["sequential_tokens_per_s"],
            r["speedup"],
            f"{r['max_abs_diff']:.1e}",
        ]
        for r in result["chunk_vs_sequential"]
    ]
    print(
        markdown_table(["layer", "chunk tok/s", "sequential tok/s", "speed-up", "max |diff|"], rows)
    )
    titans = [
        [
            r["memory_mlp"],
            r["ours_tokens_per_s"],
            r.get("titans_pytorch_tokens_per_s", r.get("titans_pytorch")),
            r.get("ratio", "-"),
        ]
        for r in result["titans"]
    ]
    print(markdown_table(["memory MLP", "ours tok/s", "titans-pytorch tok/s", "ratio"], titans))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
