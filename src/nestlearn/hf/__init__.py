"""Hugging Face ``transformers`` integration (optional extra ``hf``): see docs/scale.md.

Importing this package registers ``NestlearnConfig`` with ``AutoConfig`` (model type
``"nestlearn"``) and ``NestlearnForCausalLM`` with ``AutoModelForCausalLM``, so a folder written
by ``save_pretrained`` loads with ``AutoModelForCausalLM.from_pretrained(folder)`` once
``nestlearn.hf`` has been imported; every such folder also carries remote code
(:mod:`nestlearn.hf.remote_code`), so ``from_pretrained(folder, trust_remote_code=True)`` works in
any process with nestlearn installed (``lm_eval --model hf``, ``pipeline``). See
docs/huggingface.md.

    import nestlearn.hf
    hf = nestlearn.hf.to_hf(model)               # wraps, shares the weights
    hf.save_pretrained("out")                    # config.json + model.safetensors
    nestlearn.hf.export_checkpoint("runs/x", "out")  # a training checkpoint + its tokenizer
    hf = nestlearn.hf.NestlearnForCausalLM.from_pretrained("runs/x")  # a run folder directly
"""

from __future__ import annotations

from nestlearn.errors import MissingDependencyError, require

_transformers = require("transformers", "hf")
if int(_transformers.__version__.split(".")[0]) < 5:
    raise MissingDependencyError(
        f"nestlearn.hf needs transformers >= 5 (found {_transformers.__version__}): "
        "pip install -U 'transformers>=5' (or pip install -U 'nestlearn[hf]')"
    )

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from nestlearn.hf.cache import NestlearnCache  # noqa: E402
from nestlearn.hf.configuration import NestlearnConfig  # noqa: E402
from nestlearn.hf.convert import (  # noqa: E402
    export_checkpoint,
    from_hf,
    hf_tokenizer,
    to_hf,
)
from nestlearn.hf.modeling import NestlearnForCausalLM, causal_lm_loss  # noqa: E402

AutoConfig.register(NestlearnConfig.model_type, NestlearnConfig, exist_ok=True)
AutoModelForCausalLM.register(NestlearnConfig, NestlearnForCausalLM, exist_ok=True)

__all__ = [
    "NestlearnCache",
    "NestlearnConfig",
    "NestlearnForCausalLM",
    "causal_lm_loss",
    "export_checkpoint",
    "from_hf",
    "hf_tokenizer",
    "to_hf",
]
