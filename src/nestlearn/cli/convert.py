"""``nestlearn convert HF_DIR OUT_DIR [--levels K] [--chunk-sizes C,...] [--lrs η,...]
[--variant V] [--extra-levels E] [--allow-inexact] [--tokenizer T] [section.key=value ...]``.

Level stacking (SPEC §4, paper §7.3; docs/level-stacking.md): a local Hugging Face Llama-family
(llama, mistral, qwen2) or GPT-2 checkpoint (config.json + safetensors) becomes a HOPE-attention
run folder whose CMS levels start from the pretrained MLPs, with the checkpoint's own tokenizer
(tokenizer.json). ``model.*`` overrides change the converted model (e.g.
``model.max_seq_len=4096``, ``model.cms_objective=local``); other sections (``data.*``,
``optim.*``, ``train.*``) go into the run config that ``nestlearn train --resume OUT_DIR`` uses.
A sliding-window checkpoint (Mistral) converts with ``max_seq_len`` capped at its window.
"""

from __future__ import annotations

import argparse

from nestlearn.config.loader import parse_overrides
from nestlearn.convert import (
    EXTRA_LEVELS,
    VARIANTS,
    conversion_record,
    level_stack,
    resolve_tokenizer,
    write_run_folder,
)
from nestlearn.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got '{text}'") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated floats, got '{text}'") from None


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name,
        help="HF Llama/Mistral/Qwen2/GPT-2 checkpoint -> HOPE-attention run (level stacking)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("hf_dir", help="local Hugging Face model folder (config.json, safetensors)")
    parser.add_argument("out_dir", help="run folder to create (must not hold checkpoints)")
    parser.add_argument(
        "--levels",
        type=int,
        help="CMS levels per block (default: as many as --chunk-sizes or --lrs give, else 1)",
    )
    parser.add_argument(
        "--chunk-sizes", type=_int_list, help="C per level, slowest first (default 64,16,4,1,...)"
    )
    parser.add_argument(
        "--lrs", type=_float_list, help="inner lr per level (default 0.5 each; 0 = frozen)"
    )
    parser.add_argument("--variant", default="sequential", choices=VARIANTS)
    parser.add_argument(
        "--extra-levels",
        default="auto",
        choices=EXTRA_LEVELS,
        help="how levels 1.. start: zero (zero output map), copy (the MLP), auto (the exact one)",
    )
    parser.add_argument(
        "--allow-inexact",
        action="store_true",
        help="accept settings that do not reproduce the original at zero learning rates",
    )
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="auto (HF_DIR/tokenizer.json), byte, or a tokenizer.json path",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    model_overrides = overrides.pop("model", {})
    if "name" in model_overrides:
        raise ConfigError("model.name is always hope_attention for a converted model")
    tokenizer = resolve_tokenizer(args.tokenizer, args.hf_dir)
    levels = args.levels or len(args.chunk_sizes or args.lrs or [None])
    model = level_stack(
        args.hf_dir,
        levels=levels,
        chunk_sizes=args.chunk_sizes,
        lrs=args.lrs,
        variant=args.variant,
        extra_levels=args.extra_levels,
        exact=not args.allow_inexact,
        overrides=model_overrides,
    )
    record = conversion_record(args.hf_dir, model, args.extra_levels, not args.allow_inexact)
    checkpoint = write_run_folder(model, args.out_dir, tokenizer, sections=overrides, record=record)
    exact = "exact" if record["exact_at_zero_lr"] else f"not exact ({record['why_not_exact']})"
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"converted {record['model_type']} -> hope_attention: {model.config.n_layers} blocks x "
        f"{record['levels']} CMS level(s) ({record['variant']}), {n_params:,} parameters; "
        f"at zero CMS lrs {exact} -> {checkpoint}"
    )
    window = record["sliding_window"]
    if window is not None and model.config.max_seq_len <= window:
        print(
            f"note: the checkpoint's attention has a sliding window of {window} tokens and "
            f"hope_attention has none, so the context is max_seq_len={model.config.max_seq_len} "
            "(<= the window: exact)"
        )
    return 0
