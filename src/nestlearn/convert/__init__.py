"""Converting pretrained models into nestlearn models: level stacking (SPEC §4, paper §7.3).

``level_stack(hf_dir, levels=..., variant=...)`` reads a local Hugging Face Llama-family (Llama,
Mistral, Qwen2) or GPT-2-style folder with ``safetensors`` (no ``transformers`` needed) and
returns a ``hope_attention`` model whose CMS levels start from the pretrained MLPs;
``write_run_folder`` saves it as a run that
``nestlearn generate/eval/train --resume`` use, with the model's own tokenizer
(:class:`PretrainedTokenizer`). See docs/level-stacking.md.
"""

from nestlearn.convert.architectures import SUPPORTED
from nestlearn.convert.hf_dir import HFTensors, read_hf_config
from nestlearn.convert.level_stacking import (
    EXTRA_LEVELS,
    VARIANTS,
    conversion_record,
    default_chunk_sizes,
    inexact_reason,
    level_stack,
    resolve_extra,
    stacked_config,
    stacked_state_dict,
)
from nestlearn.convert.run_folder import resolve_tokenizer, write_run_folder
from nestlearn.convert.tokenizer import PretrainedTokenizer

__all__ = [
    "EXTRA_LEVELS",
    "SUPPORTED",
    "VARIANTS",
    "HFTensors",
    "PretrainedTokenizer",
    "conversion_record",
    "default_chunk_sizes",
    "inexact_reason",
    "level_stack",
    "read_hf_config",
    "resolve_extra",
    "resolve_tokenizer",
    "stacked_config",
    "stacked_state_dict",
    "write_run_folder",
]
