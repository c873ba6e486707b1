"""Ad-hoc level stacking (SPEC §4, paper §7.3): a pretrained Transformer becomes HOPE-attention.

Every block ``x + attn(norm(x)); x + MLP(norm(x))`` of a Llama-family (Llama, Mistral, Qwen2) or
GPT-2-style checkpoint maps to a HOPE-attention block whose CMS has ``k`` levels initialised from
that block's MLP (``MLP^{(f_i)}_0 = MLP_pretrained``); attention, norms, embeddings and head are
copied. The converted model equals the original (logits, to float error) when its CMS learning
rates are 0 exactly in the settings SPEC §4 names (:func:`inexact_reason`):

    k = 1                                  the CMS is the MLP (any variant)
    sequential, extra levels "zero"        level 0 = the MLP; levels 1.. are copies whose output
                                           map (w2, b2) is zero, so they add 0 until they learn
    independent, extra levels "copy"       every level is the MLP, Σ_l a_l = 1 (softmax), so
                                           Σ_l a_l MLP(norm(x)) = MLP(norm(x))

and not otherwise: a chain of k copies (sequential "copy", or nested, whose levels all start from
level 0's weights) applies the MLP k times; independent "zero" scales the MLP by a_0 = 1/k. With a
learning rate > 0 the outputs still equal the original's up to the first chunk end of the fastest
level, after which the model learns in context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nestlearn.config.loader import build_section
from nestlearn.convert.architectures import (
    block_tensors,
    check_model_type,
    global_tensors,
    ignorable,
    model_fields,
    sliding_window,
    window_reason,
)
from nestlearn.convert.hf_dir import HFTensors, read_hf_config
from nestlearn.errors import CheckpointError, ConfigError
from nestlearn.models.hope import HopeAttentionConfig, HopeAttentionLM

VARIANTS = ("sequential", "independent", "nested")
EXTRA_LEVELS = ("auto", "zero", "copy")
DEFAULT_LR = 0.5  # HOPE's default inner rate (CMSFields.cms_lrs); 0 keeps the original frozen


def default_chunk_sizes(levels: int) -> list[int]:
    """``64, 16, 4, 1, 1, ...``: level 0 (the pretrained MLP) slowest, each next 4x faster."""
    return [max(1, 64 // 4**i) for i in range(levels)]


def resolve_extra(variant: str, extra_levels: str) -> str:
    """``auto`` -> the exact choice: ``zero`` for sequential (and nested), ``copy`` for
    independent."""
    if extra_levels not in EXTRA_LEVELS:
        raise ConfigError(
            f"extra_levels: unknown '{extra_levels}'; choose one of {', '.join(EXTRA_LEVELS)}"
        )
    if extra_levels != "auto":
        return extra_levels
    return "copy" if variant == "independent" else "zero"


def inexact_reason(levels: int, variant: str, extra_levels: str) -> str | None:
    """Why ``levels`` levels of ``variant`` with extra levels ``extra_levels`` (``zero``/``copy``)
    do not reproduce the pretrained model at zero learning rates, or None when they do."""
    if levels == 1:
        return None
    if variant == "nested":
        return (
            "nested levels all start from level 0's weights, so k > 1 levels apply the MLP k "
            "times; use --variant sequential (extra levels zero) or independent (copies)"
        )
    if variant == "sequential" and extra_levels == "copy":
        return (
            "a sequential chain of k copies applies the MLP k times; use --extra-levels zero "
            "(extra levels start as zero residuals)"
        )
    if variant == "independent" and extra_levels == "zero":
        return (
            "independent levels are averaged with weights 1/k, so zero extra levels scale the "
            "MLP by 1/k; use --extra-levels copy (all levels the MLP, weights sum to 1)"
        )
    return None


def stacked_config(
    hf_config: Mapping[str, Any],
    *,
    levels: int = 1,
    chunk_sizes: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    variant: str = "sequential",
    overrides: Mapping[str, Any] | None = None,
    where: str = "config.json",
) -> HopeAttentionConfig:
    """The ``hope_attention`` config of a converted model: the architecture's fields
    (:func:`~nestlearn.convert.architectures.model_fields`), the CMS settings, then ``overrides``
    (``model.*`` keys without the prefix), validated like any ``model.*`` section."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ConfigError(f"levels: expected an int >= 1 (CMS levels per block), got {levels!r}")
    if variant not in VARIANTS:
        raise ConfigError(f"variant: unknown '{variant}'; choose one of {', '.join(VARIANTS)}")
    chunk_sizes = list(default_chunk_sizes(levels) if chunk_sizes is None else chunk_sizes)
    lrs = list([DEFAULT_LR] * levels if lrs is None else lrs)
    for name, values in (("chunk_sizes", chunk_sizes), ("lrs", lrs)):
        if len(values) != levels:
            raise ConfigError(f"{name}: {len(values)} entries for {levels} levels; give one each")
    fields = {"name": "hope_attention", **model_fields(hf_config, where)}
    fields |= {"cms_chunk_sizes": chunk_sizes, "cms_lrs": lrs, "cms_variant": variant}
    fields |= dict(overrides or {})
    # Validates every field's name and type (ConfigError naming it); the model checks the rest.
    return build_section("model", HopeAttentionConfig, fields)


def stacked_state_dict(
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    config: HopeAttentionConfig,
    extra_levels: str,
    where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """The state dict of the converted model from the checkpoint's ``tensors`` (HF names). A
    missing tensor or one left over names its key; shapes are checked by the caller."""
    model_type = check_model_type(hf_config, where)
    used: set[str] = set()

    def get(key: str) -> torch.Tensor:
        # GPT-2 checkpoints come with and without the "transformer." prefix.
        for candidate in (key, key.removeprefix("transformer.")):
            if candidate in tensors:
                used.add(candidate)
                return tensors[candidate]
        raise CheckpointError(
            f"{where}: tensor '{key}' is missing; is this a complete {model_type} checkpoint "
            "(and its config.json the right one)?"
        )

    state = global_tensors(model_type, get, config.tie_embeddings)
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    k = len(config.cms_chunk_sizes)
    owners = range(1 if config.cms_variant == "nested" else k)
    for i in range(config.n_layers):
        block = block_tensors(model_type, get, i, config.attn_bias, config.cms_bias)
        state.update({f"blocks.{i}.{name}": t for name, t in block["mixer"].items()})
        for level in range(k):
            prefix = f"blocks.{i}.cms.levels.{level}."
            state.update({f"{prefix}norm.{n}": t for n, t in block["mlp_norm"].items()})
            if level not in owners:
                continue
            for name, t in block["mlp"].items():
                zero = level > 0 and extra_levels == "zero" and name in ("w2", "b2")
                state[prefix + name] = torch.zeros_like(t) if zero else t
        if config.cms_variant == "independent":
            # Equal logits: softmax weights 1/k, summing to 1.
            state[f"blocks.{i}.cms.agg_logits"] = torch.zeros(k)
    left = sorted(key for key in tensors if key not in used and not ignorable(model_type, key))
    if left:
        raise CheckpointError(
            f"{where}: {len(left)} tensor(s) have no place in the converted model, e.g. "
            f"'{left[0]}'; the checkpoint does not match its config.json ({model_type})"
        )
    return state


def load_stacked(model: HopeAttentionLM, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model`` (cast to its dtype); CheckpointError names a mismatch."""
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(f"{where}: converted tensor '{key}' has no place in the model")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{where}: tensor for '{key}' has shape {list(value.shape)}, the model expects "
                f"{list(expected[key].shape)}; the checkpoint does not match its config.json "
                "(or a model.* override changed a size)"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: no tensor for '{missing[0]}' of the converted model")
    model.load_state_dict(dict(state), strict=True)


def level_stack(
    hf_dir: str | Path,
    *,
    levels: int = 1,
    chunk_sizes: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    variant: str = "sequential",
    extra_levels: str = "auto",
    exact: bool = True,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> HopeAttentionLM:
    """Convert the Hugging Face folder ``hf_dir`` (``config.json`` + safetensors, sharded or
    not; ``transformers`` is not needed) into a :class:`HopeAttentionLM` in eval mode.

    Args:
        levels: CMS levels per block (``k``); ``chunk_sizes``/``lrs`` one per level (defaults
            :func:`default_chunk_sizes` and ``0.5`` each; ``lrs`` of 0 freeze the original).
        variant: ``sequential``, ``independent`` or ``nested`` (SPEC §4).
        extra_levels: how levels 1.. start: ``zero`` (the MLP's input maps, zero output map),
            ``copy`` (the MLP) or ``auto`` (the exact one for the variant, :func:`resolve_extra`).
        exact: refuse (ConfigError with the fix) settings that cannot reproduce the original at
            zero learning rates (:func:`inexact_reason`).
        overrides: ``model.*`` fields (without the prefix) set after conversion, e.g.
            ``{"max_seq_len": 4096, "cms_objective": "local"}``.
        dtype: parameter dtype of the returned model.
    """
    where = str(hf_dir)
    hf_config = read_hf_config(hf_dir)
    check_model_type(hf_config, where)
    config = stacked_config(
        hf_config,
        levels=levels,
        chunk_sizes=chunk_sizes,
        lrs=lrs,
        variant=variant,
        overrides=overrides,
        where=where,
    )
    # Judged on the final config: a model.cms_* override may change the levels or the variant.
    levels, variant = len(config.cms_chunk_sizes), config.cms_variant
    extra = resolve_extra(variant, extra_levels)
    reason = inexact_reason(levels, variant, extra)
    if exact and reason is not None:
        raise ConfigError(
            f"{levels} levels, variant {variant}, extra levels {extra} cannot reproduce the "
            f"pretrained model: {reason} (or pass --allow-inexact / exact=False)"
        )
    # A model.max_seq_len override past a sliding window (Mistral) changes the attention.
    reason = window_reason(hf_config, config.max_seq_len)
    if exact and reason is not None:
        raise ConfigError(f"{where}: {reason} (or pass --allow-inexact / exact=False)")
    state = stacked_state_dict(hf_config, HFTensors(hf_dir), config, extra, where)
    model = HopeAttentionLM(config).to(dtype)
    load_stacked(model, state, where)
    return model.eval()


def conversion_record(
    hf_dir: str | Path, model: HopeAttentionLM, extra_levels: str, exact: bool
) -> dict[str, Any]:
    """What was converted and how, for ``conversion.json`` in the run folder."""
    cfg = model.config
    hf_config = read_hf_config(hf_dir)
    extra = resolve_extra(cfg.cms_variant, extra_levels)
    reason = inexact_reason(len(cfg.cms_chunk_sizes), cfg.cms_variant, extra)
    reason = reason or window_reason(hf_config, cfg.max_seq_len)
    return {
        "source": str(Path(hf_dir).resolve()),
        "model_type": hf_config.get("model_type"),
        "sliding_window": sliding_window(hf_config),
        "levels": len(cfg.cms_chunk_sizes),
        "variant": cfg.cms_variant,
        "extra_levels": extra,
        "exact_at_zero_lr": reason is None,
        "why_not_exact": reason,
        "exact_requested": exact,
        "model": asdict(cfg),
    }
