"""Chunkwise vs sequential memory layers, and Titans' memory against titans-pytorch.

    nestlearn bench memory [--json FILE] [--seq-len 2048] [--repeats 3] [--threads N]
                           [--layers titans_lmm,...] [--clock wall|cpu] [--device cpu|cuda]

Part 1 (issue: chunkwise >= 20x sequential): for every memory layer, forward + backward tokens/s
of the chunkwise and sequential (reference) forms, measured side by side in this run, at B=2,
T=2048, d=256, 4 heads of 64, chunk 64, float32 on the CPU, and the max abs difference of their
outputs (and of the memory op's two forms on the same inputs, ``op max |diff|``). In the same
turns, the memory op alone (``matrix_memory``, or Titans' ``mlp_memory_chunk`` /
``mlp_memory_reference``) in both forms, on leaf copies of the inputs the layer hands it:
``op_speedup`` is the op's ratio, ``shared_ms`` the rest of the chunk layer
(projections, convs, norms, gates: ``layer − op``, the same in both forms) and
``speedup_bound = sequential layer / shared``, the layer ratio a free chunk op would reach.

Part 2 (issue: >= 2x titans-pytorch): our Titans neural memory layer against
``titans_pytorch.NeuralMemory`` (optional: ``pip install 'nestlearn[bench]'``) at B=2, T=1024,
dim 256, 4 heads of 64, chunk 64, with the same memory MLP on both sides (64 -> 128 -> 64, our
default, and 64 -> 256 -> 64, theirs). Best of ``--repeats`` timings each, taken in turns
(machines are noisy). ``--clock cpu`` times with the process's CPU time instead of the wall
clock: on a machine shared with other jobs, with ``--threads 1``, it does not count the time the
process waits for a core (with more threads it would count their spin-waits). ``--device cuda``
runs both parts on the GPU (float32; every timed call ends with a CUDA synchronize).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

import nestlearn.layers.matrix_memory as matrix_layer
import nestlearn.layers.neural_memory as neural_layer
from nestlearn.layers.matrix_memory import VARIANTS, MatrixMemoryMixer
from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.memory.matrix.forms import matrix_memory
from nestlearn.memory.mlp.forms import mlp_memory_chunk, mlp_memory_reference
from nestlearn.train.report import markdown_table
from nestlearn.utils.timing import CLOCKS, best_in_turns

LAYERS = [*VARIANTS, "titans_lmm"]


def build_layer(name: str, mode: str, d_model: int, heads: int, chunk: int) -> torch.nn.Module:
    head_dim = d_model // heads
    if name == "titans_lmm":
        return NeuralMemoryMixer(d_model, heads, head_dim, chunk_size=chunk, mode=mode)
    return MatrixMemoryMixer(name, d_model, heads, head_dim, chunk_size=chunk, mode=mode)


def _leaf(x: Any) -> Any:
    """A tensor as a leaf that requires grad, with the same values, shape and strides (the op
    then pays the same layout copies as in the layer); lists and dicts entry by entry."""
    if isinstance(x, torch.Tensor):
        leaf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        return leaf.copy_(x.detach()).requires_grad_(x.is_floating_point())
    if isinstance(x, list | tuple):
        return type(x)(_leaf(e) for e in x)
    if isinstance(x, dict):
        return {key: _leaf(e) for key, e in x.items()}
    return x


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient, as a model's next layer would:
    ``out.sum().backward()`` seeds an expanded (stride-0) one, on which the op's batched matmuls
    take a slow per-matrix path and the output projection's matmuls copy it twice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def op_steps(name: str, layer: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable]:
    """``op_chunk`` and ``op_seq``: the layer's memory op alone in its two forms, on leaf copies
    of the arguments the (chunk) layer hands it for ``x``."""
    calls: list[tuple[tuple, dict]] = []

    def record(fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            calls.append((args, kwargs))
            return fn(*args, **kwargs)

        return wrapped

    if name == "titans_lmm":
        module, attr = neural_layer, "mlp_memory_chunk"
        forms = {"op_chunk": mlp_memory_chunk, "op_seq": mlp_memory_reference}
    else:
        module, attr = matrix_layer, "matrix_memory"
        forms = {
            "op_chunk": lambda *a, **kw: matrix_memory(*a, **{**kw, "mode": "chunk"}),
            "op_seq": lambda *a, **kw: matrix_memory(*a, **{**kw, "mode": "reference"}),
        }
    with mock.patch.object(module, attr, record(getattr(module, attr))), torch.no_grad():
        layer(x)
    if len(calls) != 1:
        raise RuntimeError(f"{name}: expected one call of {attr}, saw {len(calls)}")
    args, kwargs = _leaf(calls[0])
    return {key: lambda f=f: _DenseGrad.apply(f(*args, **kwargs)[0]) for key, f in forms.items()}


def fwd_bwd(step: Callable[[], torch.Tensor], device: str) -> None:
    """One forward + backward of ``step``, finished (CUDA runs asynchronously: synchronize)."""
    step().sum().backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(
    steps: dict[str, Callable[[], torch.Tensor]],
    repeats: int,
    clock: str = "wall",
    device: str = "cpu",
) -> dict[str, float]:
    """Best time (``clock``: wall or process CPU) of one forward + backward per entry, in turns
    (:func:`nestlearn.utils.timing.best_in_turns`)."""
    runs = {name: lambda step=step: fwd_bwd(step, device) for name, step in steps.items()}
    return best_in_turns(runs, repeats, clock)


def chunk_vs_sequential(
    seq_len: int,
    repeats: int,
    layers: list[str] = LAYERS,
    clock: str = "wall",
    device: str = "cpu",
) -> list[dict]:
    B, d, heads, chunk = 2, 256, 4, 64
    rows = []
    for name in layers:
        torch.manual_seed(0)
        chunked = build_layer(name, "chunk", d, heads, chunk).to(device)
        sequential = build_layer(name, "reference", d, heads, chunk).to(device)
        sequential.load_state_dict(chunked.state_dict())
        x = torch.randn(B, seq_len, d).to(device)
        with torch.no_grad():
            diff = (chunked(x)[0] - sequential(x)[0]).abs().max().item()
        steps = {
            "chunk": lambda m=chunked, x=x: _DenseGrad.apply(m(x)[0]),
            "seq": lambda m=sequential, x=x: _DenseGrad.apply(m(x)[0]),
            **op_steps(name, chunked, x),
        }
        with torch.no_grad():  # the op's two forms on the same inputs
            op_diff = (steps["op_chunk"]() - steps["op_seq"]()).abs().max().item()
        times = time_fwd_bwd(steps, repeats, clock, device)
        t_chunk, t_seq = times["chunk"], times["seq"]
        shared = t_chunk - times["op_chunk"]
        tokens = B * seq_len
        rows.append(
            {
                "layer": name,
                "chunk_tokens_per_s": tokens / t_chunk,
                "sequential_tokens_per_s": tokens / t_seq,
                "speedup": t_seq / t_chunk,
                "max_abs_diff": diff,
                "op_max_abs_diff": op_diff,
                "chunk_ms": 1e3 * t_chunk,
                "sequential_ms": 1e3 * t_seq,
                "op_chunk_ms": 1e3 * times["op_chunk"],
                "op_sequential_ms": 1e3 * times["op_seq"],
                "op_speedup": times["op_seq"] / times["op_chunk"],
                "shared_ms": 1e3 * shared,
                "speedup_bound": t_seq / shared if shared > 0 else float("inf"),
            }
        )
        print(
            f"{name}: chunk {tokens / t_chunk:,.0f} tok/s, sequential {tokens / t_seq:,.0f} "
            f"tok/s, x{t_seq / t_chunk:.1f}, op x{times['op_seq'] / times['op_chunk']:.1f}, "
            f"shared {1e3 * shared:.1f} ms, max |diff| {diff:.2e} (op {op_diff:.2e})",
            flush=True,
        )
    return rows


def against_titans_pytorch(
    repeats: int, expansion: int = 2, clock: str = "wall", device: str = "cpu"
) -> dict:
    """Both memories with the same MLP: 2 layers, ``head_dim -> expansion·head_dim -> head_dim``
    (ours ``hidden_mult``, theirs ``default_model_kwargs["expansion_factor"]``; their default is
    4, ours 2: the report gives both, each with the other side matched to it)."""
    B, T, d, heads, chunk = 2, 1024, 256, 4, 64
    torch.manual_seed(0)
    x = torch.randn(B, T, d).to(device)
    ours = NeuralMemoryMixer(d, heads, d // heads, chunk_size=chunk, hidden_mult=expansion)
    ours.to(device)
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
        ).to(device)
        steps["theirs"] = lambda: theirs(x)[0]
    times = time_fwd_bwd(steps, repeats, clock, device)
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
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall clock, or process CPU time (a loaded machine, with --threads 1)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    args = parser.parse_args(argv)
    layers = [name for name in args.layers.split(",") if name]
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown:
        parser.error(f"--layers: unknown {unknown}; choose from {LAYERS}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "seq_len": args.seq_len,
        "chunk_vs_sequential": chunk_vs_sequential(
            args.seq_len, args.repeats, layers, args.clock, args.device
        ),
        "titans": [
            against_titans_pytorch(args.repeats, e, args.clock, args.device) for e in (2, 4)
        ],
    }
    rows = [
        [
            r["layer"],
            r["chunk_tokens_per_s"],
            r["sequential_tokens_per_s"],
            r["speedup"],
            r["op_speedup"],
            r["chunk_ms"],
            r["op_chunk_ms"],
            r["shared_ms"],
            r["speedup_bound"],
            f"{r['max_abs_diff']:.1e}",
            f"{r['op_max_abs_diff']:.1e}",
        ]
        for r in result["chunk_vs_sequential"]
    ]
    headers = ["layer", "chunk tok/s", "sequential tok/s", "speed-up", "op speed-up"]
    headers += ["chunk ms", "op chunk ms", "shared ms", "bound", "max |diff|", "op max |diff|"]
    print(markdown_table(headers, rows))
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
