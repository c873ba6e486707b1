"""``nestlearn export RUN OUT_DIR [--dtype D] [--force]``: a run as a Hugging Face folder.

RUN is a run folder (its newest valid checkpoint) or a ``checkpoints/step_*`` folder. OUT_DIR
gets ``config.json`` (with ``auto_map``), ``generation_config.json``, ``model.safetensors``,
``modeling_nestlearn.py`` (imports the installed nestlearn) and the tokenizer files, so that in
any process where nestlearn is installed::

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT_DIR)
    pipeline("text-generation", model=OUT_DIR, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=OUT_DIR,trust_remote_code=True --tasks ...

load it (docs/huggingface.md). Needs the ``hf`` extra (transformers >= 5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nestlearn.errors import ConfigError, require

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name,
        help="run -> Hugging Face folder (AutoModelForCausalLM, pipeline, lm_eval --model hf)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="run folder (newest valid checkpoint) or step folder")
    parser.add_argument("out_dir", help="folder to write (must be empty or new, see --force)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="weights' dtype in the folder (default: as trained)"
    )
    parser.add_argument(
        "--force", action="store_true", help="write into OUT_DIR even if it holds files"
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"{out} is not empty; pass --force to write into it anyway")
    require("transformers", "hf")
    import torch

    from nestlearn.hf import export_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    export_checkpoint(args.run, out, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    name = config["nestlearn"]["name"]
    print(f"exported {args.run} ({name}, {config.get('dtype', '?')}) -> {out}")
    print(f"load: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")
    return 0
