"""Deep optimizers side by side: a small language model, then a noisy and an imbalanced classifier.

    nestlearn bench optim [--out runs/bench_optim] [--steps 300] [--optimizers adamw,muon,...]

Part 1: the debug transformer (``configs/debug.yaml``) on the default corpus, trained by the
Trainer with the same data, seed, schedule and token budget (``--steps`` × ``--batch-size`` ×
``--seq-len``) under every ``optim.name``: AdamW, then each deep optimizer on the matrices with
AdamW on embeddings, norms and biases, each at its default matrix lr (docs/optimizers.md);
``dmgd_paper`` is ``dmgd`` with ``optim.dmgd_form=paper`` (SPEC §3's DMGD as printed). Reports
the final validation loss, train tokens/s and the optimizer's state in bytes; writes
``lm_loss.png`` (loss curves) and ``results.json`` to ``--out``.

Part 2: a 2-hidden-layer MLP (32 → 64 → 64 → classes, tanh) trained with minibatches of 128 for
``--classifier-steps`` steps on synthetic data labelled by a random teacher MLP: (a) 4 classes
with 30% of the training labels flipped to another class, (b) 2 classes with a 10:1 imbalance in
training. Test sets are clean and balanced; reports test accuracy (and the minority class's recall
for (b)) per optimizer, mean of ``--seeds`` seeds. Same optimizer construction as the Trainer's
(``build_optimizer`` with ``optim.name``), warmup + cosine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.config import OptimConfig, load_config
from nestlearn.config.loader import _CHOICES
from nestlearn.data import prepare_data
from nestlearn.train import Trainer
from nestlearn.train.metrics import read_metrics
from nestlearn.train.optim import build_optimizer, build_scheduler, matrix_lr
from nestlearn.train.report import markdown_table, plot_losses

# Bench entries that are another entry with settings changed: label -> (optim.name, optim.* keys).
# dmgd_paper: SPEC §3's DMGD as printed (value 𝟏, read m(g), retention on every map; issue 15).
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {"dmgd_paper": ("dmgd", {"dmgd_form": "paper"})}
_BASE = list(_CHOICES[("optim", "name")])
NAMES = _BASE[: _BASE.index("dmgd") + 1] + list(VARIANTS) + _BASE[_BASE.index("dmgd") + 1 :]


def resolve(label: str) -> tuple[str, dict[str, str]]:
    """A bench label as ``optim.name`` and the ``optim.*`` settings it changes."""
    return VARIANTS.get(label, (label, {}))


def fresh(run_dir: Path) -> Path:
    """The bench's own run folder, emptied (the Trainer refuses folders holding checkpoints)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state dict (the hybrid's parts included)."""

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    sd = optimizer.state_dict()
    parts = sd["parts"].values() if "parts" in sd else [sd]
    return sum(walk(part["state"]) for part in parts)


def language_model(names: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    base = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.seq_len={args.seq_len}",
        f"train.eval_every={max(1, args.steps // 6)}",
        "train.ckpt_every=0",
        f"train.log_every={max(1, args.steps // 30)}",
        f"train.threads={args.threads}",
        "train.device=cpu",
        f"optim.warmup_steps={max(1, args.steps // 20)}",
        f"eval.max_tokens={args.eval_tokens}",
        f"model.max_seq_len={max(64, args.seq_len)}",
    ]
    corpus = prepare_data(load_config("debug", base).data, progress=False)
    # A throwaway run first: one-time costs (lazy imports, allocator) would bill the first name.
    warmup = [*base, "train.steps=3", "train.eval_every=0", "eval.max_tokens=256"]
    Trainer(
        load_config("debug", [*warmup, f"train.out_dir={fresh(out / 'lm' / '_warmup')}"]),
        corpus=corpus,
    ).fit()
    rows, curves = [], {}
    for name in names:
        run_dir = fresh(out / "lm" / name)
        optim_name, extra = resolve(name)
        overrides = [f"optim.name={optim_name}", *(f"optim.{k}={v}" for k, v in extra.items())]
        cfg = load_config("debug", [*base, *overrides, f"train.out_dir={run_dir}"])
        trainer = Trainer(cfg, corpus=corpus)
        result = trainer.fit()
        curves[name] = read_metrics(run_dir / "metrics.jsonl")
        peak = cfg.optim.lr if optim_name == "adamw" else matrix_lr(cfg.optim)
        rows.append(
            {
                "optimizer": name,
                "matrix_lr": peak,
                "val_loss": result.final_eval["loss"],
                "val_bpb": result.final_eval["bpb"],
                "tokens_per_s": result.tokens_per_s,
                "state_bytes": state_bytes(trainer.optimizer),
                "tokens": result.tokens_seen,
            }
        )
        print(
            f"lm {name}: val loss {rows[-1]['val_loss']:.4f}, "
            f"{rows[-1]['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )
    plot_losses(curves, out / "lm_loss.png", title="debug transformer, same tokens")
    return rows


class Mlp(nn.Module):
    def __init__(self, d_in: int, classes: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def teacher_data(
    seed: int, classes: int, n_train: int, n_test: int, noise: float, imbalance: float
) -> tuple[torch.Tensor, ...]:
    """Inputs ``N(0, I_32)`` labelled by a random tanh teacher; training labels corrupted."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(64, classes, generator=g)

    def label(x: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(x @ w1 / 32**0.5) @ w2
        return (logits - logits.mean(0)).argmax(-1)

    pool = torch.randn(40 * (n_train + n_test), 32, generator=g)
    y_pool = label(pool)
    per_class = [pool[y_pool == c] for c in range(classes)]
    # Test: balanced; train: class 0 ``imbalance`` times more frequent than each other class.
    k_test = n_test // classes
    x_test = torch.cat([xs[:k_test] for xs in per_class])
    y_test = torch.cat([torch.full((k_test,), c) for c in range(classes)])
    weights = [imbalance] + [1.0] * (classes - 1)
    counts = [int(n_train * w / sum(weights)) for w in weights]
    x_train = torch.cat([xs[k_test : k_test + k] for xs, k in zip(per_class, counts, strict=True)])
    y_train = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    flip = torch.rand(len(y_train), generator=g) < noise
    shift = torch.randint(1, classes, (len(y_train),), generator=g)
    y_train = torch.where(flip, (y_train + shift) % classes, y_train)
    return x_train, y_train, x_test, y_test


def train_classifier(name: str, data: tuple, classes: int, steps: int, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = Mlp(32, classes)
    optim_name, extra = resolve(name)
    cfg = replace(
        OptimConfig(), name=optim_name, warmup_steps=steps // 20, weight_decay=0.0, **extra
    )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        pred = model(x_test).argmax(-1)
    recall = [(pred[y_test == c] == c).float().mean().item() for c in range(classes)]
    return {"accuracy": (pred == y_test).float().mean().item(), "minority_recall": min(recall)}


def classifier(names: list[str], args: argparse.Namespace) -> list[dict]:
    tasks = {
        "noisy_30pct": {"classes": 4, "noise": 0.3, "imbalance": 1.0},
        "imbalanced_10to1": {"classes": 2, "noise": 0.0, "imbalance": 10.0},
    }
    rows = []
    for name in names:
        row: dict = {"optimizer": name}
        for task, spec in tasks.items():
            runs = []
            for seed in range(args.seeds):
                data = teacher_data(
                    seed, spec["classes"], 4096, 4096, spec["noise"], spec["imbalance"]
                )
                runs.append(
                    train_classifier(name, data, spec["classes"], args.classifier_steps, seed)
                )
            for key in runs[0]:
                row[f"{task}.{key}"] = sum(r[key] for r in runs) / len(runs)
        rows.append(row)
        print(f"classifier {name}: {row}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nestlearn bench optim", description=__doc__)
    parser.add_argument("--out", default="runs/bench_optim", help="folder for PNG, JSON, runs")
    parser.add_argument("--optimizers", default=",".join(NAMES), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=300, help="LM optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2, help="classifier seeds per task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {', '.join(NAMES)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": vars(args), "torch": torch.__version__, "device": "cpu"}
    start = time.perf_counter()
    if not args.skip_lm:
        result["lm"] = language_model(names, args, out)
        print(
            markdown_table(
                ["optimizer", "matrix lr", "val loss", "val bpb", "tokens/s", "state bytes"],
                [
                    [
                        r["optimizer"],
                        r["matrix_lr"],
                        r["val_loss"],
                        r["val_bpb"],
                        r["tokens_per_s"],
                        r["state_bytes"],
                    ]
                    for r in result["lm"]
                ],
            )
        )
    if not args.skip_classifier:
        result["classifier"] = classifier(names, args)
        print(
            markdown_table(
                ["optimizer", "30% noise: acc", "10:1 imbalance: acc", "minority recall"],
                [
                    [
                        r["optimizer"],
                        r["noisy_30pct.accuracy"],
                        r["imbalanced_10to1.accuracy"],
                        r["imbalanced_10to1.minority_recall"],
                    ]
                    for r in result["classifier"]
                ],
            )
        )
    result["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'lm_loss.png'}")


if __name__ == "__main__":
    main()
