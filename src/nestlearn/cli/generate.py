"""``nestlearn generate CHECKPOINT [--prompt TEXT] [sample.key=value ...]``: streamed sampling.

A prompt that is not valid UTF-8 (bytes from the shell, which Python keeps in ``sys.argv`` as
surrogate escapes) is encoded byte for byte by a byte tokenizer, whose ids are bytes; a BPE
tokenizer encodes text only, so there it is refused with a one-line error.
"""

from __future__ import annotations

import argparse
import sys

import torch

from nestlearn.config import replace as replace_cfg
from nestlearn.config.loader import parse_overrides
from nestlearn.data.tokenizer import Tokenizer
from nestlearn.errors import ConfigError, SequenceTooLongError
from nestlearn.models.sampling import generate
from nestlearn.train.checkpoint import load_model
from nestlearn.train.runtime import resolve_device


def _count(text: str) -> int:
    """argparse type of ``--max-new-tokens``: an int ``>= 0``."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="sample text from a checkpoint", description=__doc__)
    parser.add_argument("checkpoint", help="run folder (newest valid checkpoint) or step folder")
    parser.add_argument(
        "--prompt",
        help="text to continue (default: sample.prompt); bytes that are not UTF-8 are kept as "
        "bytes by a byte tokenizer and refused by a BPE one",
    )
    parser.add_argument("--max-new-tokens", type=_count)
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
    prompt, prompt_ids = encode_prompt(tokenizer, sc.prompt)
    limit = model.context_limit
    if limit is not None and len(prompt_ids) > limit:
        raise SequenceTooLongError(
            f"the prompt is {len(prompt_ids)} tokens, more than the model's context of {limit} "
            f"(model.max_seq_len); shorten --prompt"
        )
    generator = torch.Generator(device=device).manual_seed(sc.seed)
    new_ids: list[int] = []
    shown = 0
    out.write(prompt)
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
    return prompt + text


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> tuple[str, list[int]]:
    """The prompt as it is shown and its ids (``[eos]`` for an empty prompt).

    Bytes that are not UTF-8 reach Python as surrogate escapes (``'\\udcff'`` for byte 0xff);
    a byte tokenizer takes them back as the original bytes (shown as U+FFFD), a BPE tokenizer
    cannot encode them and the prompt is refused naming the byte.
    """
    try:
        data = prompt.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"the prompt has a character that is not text ({prompt[exc.start]!r} at position "
            f"{exc.start}); pass UTF-8 text"
        ) from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if tokenizer.kind != "byte":
            raise ConfigError(
                f"the prompt is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}) and this model's {tokenizer.kind} tokenizer encodes text only; "
                "pass UTF-8 text"
            ) from None
    if not data:
        return "", [tokenizer.eos_id]
    ids = list(data) if tokenizer.kind == "byte" else tokenizer.encode(prompt)
    return data.decode("utf-8", errors="replace"), ids


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
