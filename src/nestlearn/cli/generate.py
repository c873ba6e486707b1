"""``nestlearn generate CHECKPOINT [--prompt TEXT] [sample.key=value ...]``: streamed sampling."""

from __future__ import annotations

import argparse
import sys

import torch

from nestlearn.config import replace as replace_cfg
from nestlearn.config.loader import parse_overrides
from nestlearn.errors import ConfigError
from nestlearn.models.sampling import generate
from nestlearn.train.checkpoint import load_model
from nestlearn.train.runtime import resolve_device


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="sample text from a checkpoint", description=__doc__)
    parser.add_argument("checkpoint", help="run folder (newest valid checkpoint) or step folder")
    parser.add_argument("--prompt", help="text to continue (default: sample.prompt)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="sample.key=value")


def stream_text(model, tokenizer, cfg, device, out=None) -> str:
    """Sample ``cfg.sample`` continuations of its prompt, writing text as it is produced.

    Bytes of a multi-byte character can arrive in separate tokens; text is written only up to the
    last complete character, so the stream never shows a replacement character mid-way.
    """
    out = out or sys.stdout
    sc = cfg.sample
    prompt_ids = tokenizer.encode(sc.prompt) if sc.prompt else [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(sc.seed)
    new_ids: list[int] = []
    shown = 0
    out.write(sc.prompt)
    for token in generate(
        model,
        prompt_ids,
        sc.max_new_tokens,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        generator=generator,
        eos_id=tokenizer.eos_id,
        vocab_limit=tokenizer.vocab_size,
    ):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        ready = len(text.rstrip("\ufffd"))
        if ready > shown:
            out.write(text[shown:ready])
            out.flush()
            shown = ready
    text = tokenizer.decode(new_ids)
    out.write(text[shown:] + "\n")
    out.flush()
    return sc.prompt + text


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if set(overrides) - {"sample"}:
        raise ConfigError("nestlearn generate takes only sample.* overrides (or the flags)")
    flags = {
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    overrides.setdefault("sample", {}).update({k: v for k, v in flags.items() if v is not None})
    device = resolve_device(args.device)
    model, loaded = load_model(args.checkpoint, device=device)
    cfg = replace_cfg(loaded.config, overrides)
    stream_text(model, loaded.tokenizer, cfg, device)
    return 0
