"""How far is the CMS ``teach`` signal from the exact next-token gradient, per block and level?

    nestlearn bench teach_exactness [--out runs/bench_teach] [--model hope] [--train-steps 0]

The ``teach`` error source (docs/cms.md, SPEC §4) gives level ``l`` of block ``i`` at position
``s`` the logit-lens gradient ``t_s = ∂ CE(head(norm_f(h_s)), x_{s+1}) / ∂h_s`` at its output
stream ``h_s`` (``HopeLM.next_token_error``; in the independent variant ``a_l`` times it at
``x + a_l y``). The exact signal is ``e_s = ∂L/∂y_s``, ``L = Σ_s CE(logits_s, x_{s+1})``, the
gradient of the whole next-token loss with respect to that level's output at position ``s``
(autograd through every block above, the mixers' later positions and the CMS levels' in-context
updates). For each block and level this reports, over the positions with a target (all
sequences), the mean cosine ``cos(t_s, e_s)`` and the mean relative error ``‖t_s − e_s‖ /
‖e_s‖``. They are 1 and 0 for the last level of the last block (nothing but ``CE_s`` reads its
output there) and measure the approximation elsewhere.

Model: ``--model`` (hope or hope_attention) with d_model 64, ``--blocks`` blocks, CMS levels
``--chunk-sizes`` (default ``32,16,8``: three levels), byte tokenizer, stdlib corpus; fresh, or
trained by the Trainer for ``--train-steps`` steps first. Writes ``results.json`` and
``table.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.data import prepare_data
from nestlearn.models.registry import build_model
from nestlearn.train import Trainer
from nestlearn.train.report import markdown_table


@contextlib.contextmanager
def capture_levels(model: torch.nn.Module) -> Iterator[dict[tuple[int, int], tuple]]:
    """While active, every CMS level's ``(input stream, output)`` of each forward, keyed by
    ``(block, level)``, the output's gradient retained."""
    records: dict[tuple[int, int], tuple] = {}
    patched = []
    for i, block in enumerate(model.blocks):
        cms, original = block.cms, block.cms.forward

        def forward(x, state=None, teacher=None, on_level=None, i=i, original=original):
            def hook(level, base, y, sub):
                if y.requires_grad:
                    y.retain_grad()
                records[i, level] = (base, y)
                if on_level is not None:
                    on_level(level, base, y, sub)

            return original(x, state, teacher, hook)

        cms.forward = forward
        patched.append(cms)
    try:
        yield records
    finally:
        for cms in patched:
            del cms.forward


def teach_exactness(model: torch.nn.Module, tokens: torch.Tensor) -> list[dict]:
    """Per block and CMS level of a HOPE model with ``cms_objective=teach``: the mean cosine and
    relative norm error between the teach signal and the exact ``∂L/∂y`` (module docstring) over
    the positions ``0..T−2`` of ``tokens [B, T]``."""
    if model.config.cms_objective != "teach":
        raise ValueError("teach_exactness: the model's cms_objective must be 'teach'")
    targets = tokens[:, 1:]
    with capture_levels(model) as records:
        logits, _ = model(tokens)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"
        )  # Σ_s CE_s: the per-position scale of the teach signal
        loss.backward()
    rows = []
    for (block, level), (base, y) in sorted(records.items()):
        cms = model.blocks[block].cms
        a = 1.0
        if cms.variant == "independent":
            a = torch.softmax(cms.agg_logits.detach(), 0)[level]
        with torch.no_grad():
            teach = a * model.next_token_error((base + a * y)[:, :-1], targets)
            exact = y.grad[:, :-1]
            cos = F.cosine_similarity(teach, exact, dim=-1)
            rel = (teach - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)
        rows.append(
            {
                "block": block,
                "level": level,
                "chunk_size": cms.chunk_sizes[level],
                "cosine": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "relative_error": float(rel.mean()),
                "norm_ratio": float((teach.norm(dim=-1) / exact.norm(dim=-1)).mean()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nestlearn bench teach_exactness", description=__doc__)
    parser.add_argument("--out", default="runs/bench_teach")
    parser.add_argument("--model", default="hope", choices=["hope", "hope_attention"])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--chunk-sizes", default="32,16,8", help="CMS C(l), one per level")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=0, help="0 = a fresh model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(c) for c in args.chunk_sizes.split(",")]
    overrides = [
        f"model.name={args.model}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.blocks}",
        "model.n_heads=4",
        f"model.max_seq_len={max(64, args.seq_len)}",
        f"model.cms_chunk_sizes=[{','.join(map(str, sizes))}]",
        f"model.cms_lrs=[{','.join(['0.5'] * len(sizes))}]",
        f"train.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_size}",
        f"train.seed={args.seed}",
        "train.device=cpu",
        "train.progress=false",
        f"train.threads={args.threads}",
    ]
    cfg = load_config("debug", overrides)
    corpus = prepare_data(cfg.data, progress=False)
    if args.train_steps > 0:
        run_dir = out / "train"
        shutil.rmtree(run_dir, ignore_errors=True)
        train = [
            *overrides,
            f"train.steps={args.train_steps}",
            f"optim.warmup_steps={max(1, args.train_steps // 10)}",
            "train.eval_every=0",
            "train.ckpt_every=0",
            f"train.log_every={max(1, args.train_steps // 10)}",
            "eval.max_tokens=2048",
            f"train.out_dir={run_dir}",
        ]
        trainer = Trainer(load_config("debug", train), corpus=corpus)
        trainer.fit()
        model = trainer.model
    else:
        torch.manual_seed(args.seed)
        model = build_model(replace(cfg.model, vocab_size=corpus.tokenizer.vocab_size))
    model = model.double().train()
    n = args.batch_size * args.seq_len
    tokens = torch.as_tensor(corpus.val[:n].astype("int64")).view(args.batch_size, args.seq_len)
    rows = teach_exactness(model, tokens)
    table = markdown_table(
        ["block", "level", "C", "cosine (mean)", "cosine (min)", "rel. error", "‖t‖/‖e‖"],
        [
            [
                r["block"],
                r["level"],
                r["chunk_size"],
                r["cosine"],
                r["cosine_min"],
                r["relative_error"],
                r["norm_ratio"],
            ]
            for r in rows
        ],
    )
    print(table)
    result = {"settings": vars(args), "overrides": overrides, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
