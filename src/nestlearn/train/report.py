"""End-of-run artefacts: loss curves (PNG) and markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nestlearn.utils.io import atomic_write_text


def plot_losses(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str = ""
) -> None:
    """Train (thin) and validation (markers) loss against tokens seen, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "eval"]
        if train:
            ax.plot(
                [r["tokens"] for r in train],
                [r["loss"] for r in train],
                color=color,
                alpha=0.6,
                lw=1.2,
                label=f"{label} train",
            )
        if val:
            ax.plot(
                [r["tokens"] for r in val],
                [r["loss"] for r in val],
                color=color,
                marker="o",
                lw=1.8,
                label=f"{label} validation",
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, text: str) -> None:
    atomic_write_text(Path(path), text)
