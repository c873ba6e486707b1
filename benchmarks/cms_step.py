"""CMS inner step, ours against the paper's: where does NL-31's plain summed step stay finite?

    nestlearn bench cms_step [--out runs/bench_cms_step] [--lrs 1e-3,1e-2,0.1,0.5] [--steps 120]

The same small HOPE (``model.name=hope``: self-modifying Titans + a 2-level CMS, d_model 64, 2
blocks, T 128, ``cms_chunk_sizes=[64,16]``; the stdlib corpus, byte tokenizer) is trained by the
Trainer for ``--steps`` steps at each ``model.cms_lrs=[η,η]`` with ``model.cms_step=normalized``
(``η / (1 + E)``, ours, default) and ``plain`` (``η``, NL-31 as printed; memory/cms.py). Same
data, seed and schedule in every run. Reports per run: finite or not (the Trainer stops at the
first non-finite loss, naming the step), the mean train loss over the last 20% of the steps, the
validation loss, and ``1 + E`` of each CMS level of the last block on validation chunks (how much
larger the plain step is than the normalized one there). Writes ``results.json`` and a markdown
table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from nestlearn.config import load_config
from nestlearn.data import prepare_data
from nestlearn.errors import NonFiniteLossError, NonFiniteMemoryError
from nestlearn.train import Trainer
from nestlearn.train.metrics import read_metrics
from nestlearn.train.report import markdown_table

STEPS = ("normalized", "plain")


def overrides(args: argparse.Namespace) -> list[str]:
    """The model and run settings shared by every run (module docstring)."""
    return [
        "model.name=hope",
        f"model.d_model={args.d_model}",
        "model.n_layers=2",
        "model.n_heads=4",
        f"model.max_seq_len={args.seq_len}",
        "model.cms_chunk_sizes=[64,16]",
        f"train.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_size}",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.log_every=1",
        f"train.threads={args.threads}",
        "train.device=cpu",
        "train.progress=false",
        f"train.seed={args.seed}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        f"eval.max_tokens={args.eval_tokens}",
    ]


@torch.no_grad()
def step_ratio(model: torch.nn.Module, corpus, batch: int = 4) -> list[float]:
    """Per CMS level of the last block: ``1 + E`` of one full chunk (``C`` pairs) of validation
    tokens, mean over ``batch`` sequences: the factor by which the plain step exceeds the
    normalized one for that chunk. Read from the decoding state after ``2 C − 1`` tokens (the
    second chunk's ``C`` pairs accumulated, not yet applied)."""
    model.eval()
    sizes = model.config.cms_chunk_sizes
    last = len(model.blocks) - 1
    ratios = []
    for level, chunk in enumerate(sizes):
        n = 2 * chunk - 1
        ids = torch.as_tensor(corpus.val[: batch * n].astype("int64")).view(batch, n)
        _, state = model(ids, model.init_state(batch))
        ratios.append(float((1.0 + state[f"blocks.{last}.cms.{level}.e"]).mean()))
    return ratios


def run_one(base: list[str], step: str, lr: float, out: Path, corpus) -> dict:
    run_dir = out / f"{step}_{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        "debug",
        [*base, f"model.cms_step={step}", f"model.cms_lrs=[{lr},{lr}]", f"train.out_dir={run_dir}"],
    )
    trainer = Trainer(cfg, corpus=corpus)
    row: dict = {"cms_step": step, "cms_lr": lr, "finite": True, "failed_at": None}
    start = time.perf_counter()
    try:
        result = trainer.fit()
        row["val_loss"] = result.final_eval.get("loss", math.nan)
    except (NonFiniteLossError, NonFiniteMemoryError) as exc:
        row.update(finite=False, val_loss=math.nan, error=str(exc).split(";")[0])
    losses = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    if not row["finite"] and losses:
        row["failed_at"] = losses[-1]["step"] + 1
    tail = losses[-max(1, len(losses) // 5) :] if row["finite"] else []
    row["train_loss"] = sum(r["loss"] for r in tail) / len(tail) if tail else math.nan
    row["one_plus_e"] = step_ratio(trainer.model, corpus) if row["finite"] else []
    row["seconds"] = time.perf_counter() - start
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nestlearn bench cms_step", description=__doc__)
    parser.add_argument("--out", default="runs/bench_cms_step")
    parser.add_argument("--lrs", default="1e-3,1e-2,0.1,0.5", help="comma-separated cms_lrs η")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--steps-to-run", default=",".join(STEPS), help="normalized,plain")
    args = parser.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    kinds = [s.strip() for s in args.steps_to_run.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = overrides(args)
    corpus = prepare_data(load_config("debug", base).data, progress=False)
    rows = []
    for step in kinds:
        for lr in lrs:
            rows.append(run_one(base, step, lr, out, corpus))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(
        [
            "cms_step",
            "cms_lrs",
            "finite",
            "failed at step",
            "train loss",
            "val loss",
            "1 + E (levels, last block)",
        ],
        [
            [
                r["cms_step"],
                r["cms_lr"],
                "yes" if r["finite"] else "no",
                r["failed_at"] or "",
                r["train_loss"],
                r["val_loss"],
                " / ".join(f"{x:.3g}" for x in r["one_plus_e"]),
            ]
            for r in rows
        ],
    )
    print(table)
    result = {"settings": vars(args), "overrides": base, "rows": rows, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
