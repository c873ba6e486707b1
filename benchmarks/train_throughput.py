"""Training throughput, peak memory and MFU of several models, side by side in one run.

    nestlearn bench train [CONFIG ...] [--models all | --suite NAME] [section.key=value ...]
                          [--batch-size B] [--seq-len T] [--steps N] [--warmup N] [--repeat R]
                          [--threads N] [--ratio-to LABEL] [--json FILE] [--markdown FILE]

Rows: the named configs given, or a suite (``--suite``: ``tiny``, the default and the same as
``--models all``: every architecture's ``*-tiny`` config; ``hope-vs-transformer``: HOPE at the
``small`` scale against a Transformer++ of the same parameter count, issue 6;
``hope-vs-transformer-tiny``: the same at the ``tiny`` scale, with HOPE also recomputing its
memories in backward, issue 16; ``340m``: the
paper-scale configs at T=4096, for a GPU). Every row trains at the same batch size and sequence
length (``--batch-size``/``--seq-len``, else the suite's, else the first config's); overrides
apply to every row.

Each model runs in a fresh process (``_train_worker.py``, whose docstring defines each figure):
tokens/s is ``B·T`` over the median step time; peak memory is CUDA's ``max_memory_allocated`` or,
on the CPU, the growth of the process's peak resident set; FLOPs/token is the model's own count
and, for a check, ``FlopCounterMode``'s on one step. The peak is the best FLOP/s of a square
dense matmul in the training dtype on the same device and threads, measured before and after the
models (the larger is used); ``MFU = tokens/s · FLOPs/token / peak``. With ``--repeat R`` the
list runs R times in turns (a, b, a, b, ...) so that a burst of load on a shared machine hits
every model alike; step times are pooled. ``step / ref`` is a row's median step time over the
``--ratio-to`` row's (default: the Transformer++, if listed); ``peak / ref`` and ``MFU / ref``
likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nestlearn.config import load_config
from nestlearn.config.loader import named_configs
from nestlearn.errors import ConfigError
from nestlearn.train.report import markdown_table
from nestlearn.train.runtime import resolve_device, resolve_precision

WORKER = Path(__file__).with_name("_train_worker.py")


@dataclass(frozen=True)
class Row:
    label: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    rows: tuple[Row, ...]
    batch_size: int = 0  # 0 = the first config's
    seq_len: int = 0
    note: str = ""


# HOPE with its memories recomputed in backward instead of kept (less memory, more FLOPs).
RECOMPUTE = ("model.cms_recompute=true", "model.sm_recompute=true")
ARCHITECTURES_340M = ("transformer", "hope", "hope_attention", "gated_deltanet", "titans_lmm")


def tiny_rows() -> tuple[Row, ...]:
    """Every architecture at the ``tiny`` scale: ``tiny`` (the Transformer++) and ``*-tiny``."""
    names = ["tiny", *(n for n in named_configs() if n.endswith("-tiny"))]
    return tuple(Row(n.removesuffix("-tiny") if n != "tiny" else "transformer", n) for n in names)


def suites() -> dict[str, Suite]:
    return {
        "tiny": Suite(tiny_rows()),
        "hope-vs-transformer": Suite(
            (
                Row("transformer", "transformer-hope-small"),
                Row("hope-small", "hope-small"),
            ),
            batch_size=8,
            seq_len=256,
            note="issue 6: HOPE small step time <= 2x a Transformer++ of equal parameter count",
        ),
        "hope-vs-transformer-tiny": Suite(
            (
                Row("transformer", "tiny"),
                Row("hope", "hope-tiny"),
                Row("hope-recompute", "hope-tiny", RECOMPUTE),
            ),
            batch_size=16,
            seq_len=128,
            note="issue 16 at the tiny scale (2.56M vs 2.75M parameters): HOPE MFU >= 0.75x "
            "and peak memory <= 2.5x the Transformer++'s; hope-recompute: backward recomputes "
            "the memories (model.cms_recompute, model.sm_recompute)",
        ),
        "340m": Suite(
            tuple(
                Row(a, "340m" if a == "transformer" else f"{a}-340m") for a in ARCHITECTURES_340M
            ),
            batch_size=4,
            seq_len=4096,
            note="paper scale at T=4096; meant for a GPU (bf16 autocast, CUDA peak memory)",
        ),
    }


def select_rows(args: argparse.Namespace) -> tuple[Suite, str]:
    """The suite to run: ``--suite``, ``--models all`` or the configs named on the line."""
    table = suites()
    if args.configs and (args.suite or args.models):
        raise ConfigError("give configs or --suite/--models, not both")
    if args.models and args.models != "all":
        raise ConfigError(f"--models takes 'all' (got {args.models!r}); or name configs instead")
    if args.configs:
        labels = [load_config(c).model.name for c in args.configs]
        unique = len(set(labels)) == len(labels)
        rows = tuple(
            Row(lab if unique else c, c) for lab, c in zip(labels, args.configs, strict=True)
        )
        return Suite(rows), "configs"
    name = args.suite or "tiny"
    if name not in table:
        raise ConfigError(f"no suite {name!r}; suites: {', '.join(table)}")
    return table[name], name


@dataclass
class Plan:
    """Rows with their final override lists, and the shared device / precision / B / T."""

    rows: list[Row]
    overrides: dict[str, list[str]]
    device: torch.device
    precisions: list[str]
    batch_size: int
    seq_len: int
    errors: dict[str, str] = field(default_factory=dict)


def make_plan(suite: Suite, args: argparse.Namespace) -> Plan:
    first = load_config(suite.rows[0].config, [*suite.rows[0].overrides, *args.overrides])
    B = args.batch_size or suite.batch_size or first.train.batch_size
    T = args.seq_len or suite.seq_len or first.train.seq_len
    shared = [*args.overrides, f"train.batch_size={B}", f"train.seq_len={T}"]
    if args.threads:
        shared.append(f"train.threads={args.threads}")
    overrides, devices, precisions = {}, set(), []
    for row in suite.rows:
        ov = [*row.overrides, *shared]
        cfg = load_config(row.config, ov)
        if getattr(cfg.model, "max_seq_len", T) < T:
            ov.append(f"model.max_seq_len={T}")
        device = resolve_device(cfg.train.device)
        devices.add(str(device))
        precision = resolve_precision(cfg.train.precision, device)
        if precision not in precisions:
            precisions.append(precision)
        overrides[row.label] = ov
    if len(devices) > 1:
        raise ConfigError(
            f"rows run on different devices ({', '.join(sorted(devices))}); "
            "set train.device=... for all"
        )
    if len(overrides) < len(suite.rows):
        raise ConfigError("two rows share a label; name each config once")
    return Plan(list(suite.rows), overrides, device, precisions, B, T)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 0, reps: int = 5) -> float:
    """Best FLOP/s of ``a @ b`` for square ``n×n`` operands (default n = 2048 on the CPU, 8192 on a
    GPU, large enough to saturate it): ``2n³`` FLOPs over the fastest of ``reps`` timed calls."""
    n = n or (8192 if device.type == "cuda" else 2048)
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


def measure_peaks(plan: Plan, n: int) -> dict[str, float]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: matmul_peak_flops(plan.device, dtypes[p], n) for p in plan.precisions}


def run_worker(spec: dict[str, Any], in_process: bool, timeout: float | None) -> dict[str, Any]:
    """One row's measurement: a fresh ``_train_worker.py`` process, or this one."""
    if in_process:
        import runpy

        result = runpy.run_path(str(WORKER), run_name="nestlearn_bench_worker")["measure"](spec)
        if result["memory_kind"].startswith("cpu"):
            result["peak_memory_bytes"] = None  # this process's peak predates the row
        return result
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit status {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the step times of a row's repeats; the largest peak memory; the first FLOP count."""
    row = dict(results[0])
    times = [t for r in results for t in r["step_times_s"]]
    row["step_times_s"] = times
    row["step_s"] = statistics.median(times)
    row["tokens_per_s"] = round(row["batch_size"] * row["seq_len"] / row["step_s"], 1)
    peaks = [r["peak_memory_bytes"] for r in results if r["peak_memory_bytes"] is not None]
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    return row


def finish_row(row: dict[str, Any], peak: float) -> dict[str, Any]:
    counted = row["counted_flops_per_token"]
    row["flop_count_ratio"] = round(counted / row["flops_per_token"], 4) if counted else None
    row["mfu"] = round(row["tokens_per_s"] * row["flops_per_token"] / peak, 5)
    row["mfu_counted"] = round(row["tokens_per_s"] * counted / peak, 5) if counted else None
    return row


def run_plan(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks_before = measure_peaks(plan, args.peak_n)
    log(
        f"matmul peak: {_peaks_text(peaks_before)} on {plan.device}, {torch.get_num_threads()} "
        f"threads; {len(plan.rows)} models at B={plan.batch_size} T={plan.seq_len}"
    )
    results: dict[str, list[dict[str, Any]]] = {r.label: [] for r in plan.rows}
    total, done = len(plan.rows) * args.repeat, 0
    for rep in range(args.repeat):
        for row in plan.rows:
            done += 1
            if row.label in plan.errors:
                continue
            spec = {
                "config": row.config,
                "overrides": plan.overrides[row.label],
                "steps": args.steps,
                "warmup": args.warmup,
                "count_flops": rep == 0 and not args.no_flop_count,
            }
            log(f"[{done}/{total}] {row.label} ({row.config}) ...", end="")
            start = time.perf_counter()
            try:
                result = run_worker(spec, args.in_process, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                plan.errors[row.label] = str(exc)
                log(f" failed: {exc}")
                continue
            results[row.label].append(result)
            log(
                f" {result['tokens_per_s']:,.0f} tok/s, {result['step_s'] * 1e3:,.0f} ms/step"
                f" ({time.perf_counter() - start:.0f} s)"
            )
    peaks_after = measure_peaks(plan, args.peak_n)
    peaks = {p: max(peaks_before[p], peaks_after[p]) for p in peaks_before}
    rows = []
    for row in plan.rows:
        if results[row.label]:
            combined = combine(results[row.label])
            finish_row(combined, peaks[combined["precision"]])
            rows.append({"label": row.label, "row_overrides": list(row.overrides), **combined})
        else:
            rows.append({"label": row.label, "config": row.config, "error": plan.errors[row.label]})
    add_ratio(rows, args.ratio_to)
    return {
        "benchmark": "train_throughput",
        "suite": args.suite_name,
        "device": str(plan.device),
        "device_name": _device_name(plan.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "ratio_to": args.ratio_to,
        "matmul_peak_flops": {p: round(v) for p, v in peaks.items()},
        "matmul_peak_flops_before": {p: round(v) for p, v in peaks_before.items()},
        "matmul_peak_flops_after": {p: round(v) for p, v in peaks_after.items()},
        "rows": rows,
    }


def add_ratio(rows: list[dict[str, Any]], ref: str | None) -> None:
    """Each row over the ``ref`` row (label or model): ``step_ratio`` (median step times),
    ``mfu_ratio`` (MFUs) and ``peak_ratio`` (peak memories; None where either is unknown)."""
    match = [r for r in rows if "step_s" in r and ref in (r["label"], r.get("model"))]
    first = match[0] if match else None
    for row in rows:
        if "step_s" not in row:
            continue
        row["step_ratio"] = row["mfu_ratio"] = row["peak_ratio"] = None
        if first is None:
            continue
        row["step_ratio"] = round(row["step_s"] / first["step_s"], 3)
        row["mfu_ratio"] = round(row["mfu"] / first["mfu"], 3)
        peaks = row["peak_memory_bytes"], first["peak_memory_bytes"]
        if all(peaks):
            row["peak_ratio"] = round(peaks[0] / peaks[1], 3)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _peaks_text(peaks: dict[str, float]) -> str:
    return ", ".join(f"{v / 1e9:,.1f} GFLOP/s {p}" for p, v in peaks.items())


def log(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def markdown_report(report: dict[str, Any]) -> str:
    headers = [
        "model",
        "config",
        "params",
        "tokens/s",
        "step ms",
        f"step / {report['ratio_to']}",
        "peak MiB",
        f"peak / {report['ratio_to']}",
        "MFLOP/token (model)",
        "MFLOP/token (counted)",
        "MFU %",
        f"MFU / {report['ratio_to']}",
    ]
    table = []
    for r in report["rows"]:
        if "error" in r:
            table.append([r["label"], r["config"], "failed: " + r["error"], *["-"] * 9])
            continue
        counted = r["counted_flops_per_token"]
        mem = r["peak_memory_bytes"]
        config = " ".join([r["config"], *r["row_overrides"]])
        table.append(
            [
                r["label"],
                config,
                r["params"],
                r["tokens_per_s"],
                r["step_s"] * 1e3,
                _times(r["step_ratio"]),
                "-" if mem is None else mem / 2**20,
                _times(r["peak_ratio"]),
                r["flops_per_token"] / 1e6,
                "-" if counted is None else counted / 1e6,
                100 * r["mfu"],
                _times(r["mfu_ratio"]),
            ]
        )
    memory = (
        "CUDA max_memory_allocated"
        if report["device"].startswith("cuda")
        else ("growth of the process's peak RSS (fresh process per model)")
    )
    load = report["load_average"]
    return (
        f"Training throughput on {report['device']} ({report['device_name']}, "
        f"{report['threads']} threads, torch {report['torch']}"
        + (f", load average {load[0]}" if load else "")
        + f"): B={report['batch_size']}, T={report['seq_len']}, median of "
        f"{report['steps']} x {report['repeat']} timed steps after {report['warmup']} warm-up. "
        f"Matmul peak {_peaks_text(report['matmul_peak_flops'])}; peak memory = {memory}.\n\n"
        + markdown_table(headers, table)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nestlearn bench train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("words", nargs="*", metavar="CONFIG | section.key=value")
    parser.add_argument("--models", help="'all': every architecture's *-tiny config")
    parser.add_argument("--suite", help=f"one of: {', '.join(suites())}")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="run the list R times in turns")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--ratio-to", default="transformer", help="label or model of the ref row")
    parser.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak")
    parser.add_argument("--no-flop-count", action="store_true", help="skip FlopCounterMode")
    parser.add_argument("--in-process", action="store_true", help="no subprocess (no CPU memory)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per model run")
    parser.add_argument("--json", help="write the report as JSON")
    parser.add_argument("--markdown", help="write the table as markdown")
    args = parser.parse_args(argv)
    args.configs = [w for w in args.words if "=" not in w]
    args.overrides = [w for w in args.words if "=" in w]
    for name in ("steps", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    suite, args.suite_name = select_rows(args)
    if suite.note:
        log(f"suite {args.suite_name}: {suite.note}")
    plan = make_plan(suite, args)
    report = run_plan(plan, args)
    text = markdown_report(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return report


if __name__ == "__main__":
    main()
