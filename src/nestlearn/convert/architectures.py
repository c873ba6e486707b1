"""Hugging Face architectures that level stacking reads: config fields and tensor names.

Each architecture maps its ``config.json`` to ``hope_attention`` fields (:func:`model_fields`)
and its tensors, one block at a time, to the pieces of a HOPE-attention block
(:func:`block_tensors`): the attention norm, fused ``qkv`` and output projections, the MLP's norm
and the MLP's weights under the CMS names ``w1, (w3), w2, (b1, (b3), b2)`` (``[out, in]``).

    llama    q/k/v/o_proj (GQA: num_key_value_heads), gate/up/down_proj SwiGLU (w1 = gate,
             w3 = up, w2 = down), RMSNorm, RoPE (rope_theta), tied or untied lm_head
    mistral  Llama's tensors, no biases; its sliding-window attention (sliding_window = W:
             position i attends to i-W+1 .. i) equals full causal attention on sequences of at
             most W tokens, so the converted model's max_seq_len is capped at W
             (:func:`window_reason` judges a longer one)
    qwen2    Llama's tensors plus q/k/v biases (o_proj has none: a zero output bias here); a
             sliding window only when use_sliding_window is true, capped likewise
    gpt2     c_attn (fused q, k, v) and c_proj, c_fc/c_proj GELU(tanh) MLP, all with biases and
             stored as Conv1D ``[in, out]`` (transposed here), LayerNorm with bias, learned
             position embeddings wpe, head tied to wte
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nestlearn.errors import ConfigError

SUPPORTED = ("llama", "gpt2", "mistral", "qwen2")
# Llama's block structure and tensor names: the model types that differ only in config fields.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
Getter = Callable[[str], torch.Tensor]


def check_model_type(hf: Mapping[str, Any], where: str) -> str:
    """The ``model_type`` of ``config.json`` if supported; ConfigError naming the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"{where}: model_type '{model_type}' is not supported by level stacking; supported: "
            f"{', '.join(SUPPORTED)} (Llama-family and GPT-2-style checkpoints)"
        )
    return model_type


def family(model_type: str) -> str:
    """``llama`` for every Llama-family model type (same tensors), else the type itself."""
    return "llama" if model_type in LLAMA_FAMILY else model_type


def sliding_window(hf: Mapping[str, Any]) -> int | None:
    """The attention window ``W`` the checkpoint uses (position ``i`` attends to ``i-W+1 .. i``),
    or None for full causal attention: Mistral's ``sliding_window``; Qwen2's only when
    ``use_sliding_window`` is true and some layer is a ``sliding_attention`` one."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if hf.get("model_type") == "qwen2":
        layer_types = hf.get("layer_types")
        if not hf.get("use_sliding_window", False) or (
            layer_types is not None and "sliding_attention" not in layer_types
        ):
            return None
    return int(window)


def window_reason(hf: Mapping[str, Any], max_seq_len: int) -> str | None:
    """Why a converted model of context ``max_seq_len`` differs from the checkpoint's sliding-
    window attention, or None when it does not (no window, or ``max_seq_len <= W``: on at most W
    tokens a window of W is full causal attention)."""
    window = sliding_window(hf)
    if window is None or max_seq_len <= window:
        return None
    return (
        f"the checkpoint attends over a sliding window of {window} tokens and hope_attention has "
        f"no sliding window: at model.max_seq_len={max_seq_len} positions past {window} would "
        f"see more context than the original; keep model.max_seq_len <= {window} (the default)"
    )


def _require(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{where}: config.json has no '{key}'; is it a complete HF config?")
    return hf[key]


def model_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``hope_attention`` fields reproducing the architecture; ConfigError for a setting it
    cannot reproduce (it names the field and the value)."""
    model_type = check_model_type(hf, where)
    if family(model_type) == "llama":
        return _llama_fields(hf, where)
    return _gpt2_fields(hf, where)


def _llama_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    d, heads = (
        int(_require(hf, "hidden_size", where)),
        int(_require(hf, "num_attention_heads", where)),
    )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act '{act}' is not supported (Llama's SwiGLU: silu)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        raise ConfigError(
            f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={d}; "
            "hope_attention uses head_dim = hidden_size / num_attention_heads"
        )
    # transformers >= 5 writes rope_parameters; older configs rope_theta and rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", "default")
    if kind != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise ConfigError(
            f"{where}: RoPE scaling ({kind if kind != 'default' else scaling}) is not supported; "
            "only plain RoPE (rope_type 'default') converts exactly"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = sliding_window(hf)
    if window is not None:
        # Exact: on at most W tokens the sliding window is full causal attention.
        max_seq_len = min(max_seq_len, window)
    return {
        "vocab_size": int(_require(hf, "vocab_size", where)),
        "d_model": d,
        "n_layers": int(_require(hf, "num_hidden_layers", where)),
        "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "max_seq_len": max_seq_len,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "positions": "rope",
        # Qwen2 always has q/k/v biases (and no attention_bias field).
        "attn_bias": hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
        "norm": "rms",
        "cms_mlp": "swiglu",
        "cms_bias": bool(hf.get("mlp_bias", False)),
        "cms_hidden": int(_require(hf, "intermediate_size", where)),
    }


def _gpt2_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(
            f"{where}: activation_function '{act}' is not supported (GPT-2's tanh GELU: gelu_new)"
        )
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            f"{where}: scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true is not "
            "supported; hope_attention scales scores by 1/sqrt(head_dim)"
        )
    if hf.get("add_cross_attention", False):
        raise ConfigError(
            f"{where}: add_cross_attention=true (an encoder-decoder) is not supported"
        )
    d = int(_require(hf, "n_embd", where))
    return {
        "vocab_size": int(_require(hf, "vocab_size", where)),
        "d_model": d,
        "n_layers": int(_require(hf, "n_layer", where)),
        "n_heads": int(_require(hf, "n_head", where)),
        "n_kv_heads": 0,
        "max_seq_len": int(_require(hf, "n_positions", where)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "positions": "learned",
        "attn_bias": True,
        "norm": "layer",
        "cms_mlp": "gelu_tanh",
        "cms_bias": True,
        "cms_hidden": int(hf.get("n_inner") or 4 * d),
    }


def global_tensors(model_type: str, get: Getter, tied: bool) -> dict[str, torch.Tensor]:
    """Embedding, position table, final norm and head under our names (``head.weight`` only when
    untied)."""
    if family(model_type) == "llama":
        out = {
            "embed.weight": get("model.embed_tokens.weight"),
            "norm.weight": get("model.norm.weight"),
        }
        if not tied:
            out["head.weight"] = get("lm_head.weight")
        return out
    out = {
        "embed.weight": get("transformer.wte.weight"),
        "pos_embed.weight": get("transformer.wpe.weight"),
        "norm.weight": get("transformer.ln_f.weight"),
        "norm.bias": get("transformer.ln_f.bias"),
    }
    if not tied:
        out["head.weight"] = get("lm_head.weight")
    return out


def block_tensors(model_type: str, get: Getter, i: int, attn_bias: bool, mlp_bias: bool) -> dict:
    """Block ``i``: ``{"mixer": {name: tensor}, "mlp_norm": {weight, (bias)}, "mlp": {w1, ...}}``
    with mixer names relative to ``blocks.{i}.``."""
    if family(model_type) == "llama":
        return _llama_block(get, i, attn_bias, mlp_bias, out_bias=model_type != "qwen2")
    return _gpt2_block(get, i)


def _llama_block(get: Getter, i: int, attn_bias: bool, mlp_bias: bool, out_bias: bool) -> dict:
    p = f"model.layers.{i}."
    qkv = [get(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
    mixer = {
        "mixer_norm.weight": get(f"{p}input_layernorm.weight"),
        "mixer.attn.qkv.weight": torch.cat(qkv, 0),
        "mixer.attn.out.weight": get(f"{p}self_attn.o_proj.weight"),
    }
    if attn_bias:
        mixer["mixer.attn.qkv.bias"] = torch.cat(
            [get(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]
        )
        # Qwen2 biases q/k/v only; our shared switch gives ``out`` a bias too, which is zero.
        out = mixer["mixer.attn.out.weight"]
        mixer["mixer.attn.out.bias"] = (
            get(f"{p}self_attn.o_proj.bias") if out_bias else out.new_zeros(out.shape[0])
        )
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    mlp = {ours: get(f"{p}mlp.{theirs}.weight") for ours, theirs in names.items()}
    if mlp_bias:
        mlp |= {f"b{ours[1]}": get(f"{p}mlp.{theirs}.bias") for ours, theirs in names.items()}
    return {
        "mixer": mixer,
        "mlp_norm": {"weight": get(f"{p}post_attention_layernorm.weight")},
        "mlp": mlp,
    }


def _gpt2_block(get: Getter, i: int) -> dict:
    p = f"transformer.h.{i}."
    # Conv1D stores [in, out]: y = x W + b, so the Linear weight is the transpose.
    mixer = {
        "mixer_norm.weight": get(f"{p}ln_1.weight"),
        "mixer_norm.bias": get(f"{p}ln_1.bias"),
        "mixer.attn.qkv.weight": get(f"{p}attn.c_attn.weight").T,
        "mixer.attn.qkv.bias": get(f"{p}attn.c_attn.bias"),
        "mixer.attn.out.weight": get(f"{p}attn.c_proj.weight").T,
        "mixer.attn.out.bias": get(f"{p}attn.c_proj.bias"),
    }
    mlp = {
        "w1": get(f"{p}mlp.c_fc.weight").T,
        "b1": get(f"{p}mlp.c_fc.bias"),
        "w2": get(f"{p}mlp.c_proj.weight").T,
        "b2": get(f"{p}mlp.c_proj.bias"),
    }
    norm = {"weight": get(f"{p}ln_2.weight"), "bias": get(f"{p}ln_2.bias")}
    return {"mixer": mixer, "mlp_norm": norm, "mlp": mlp}


def ignorable(model_type: str, key: str) -> bool:
    """Tensors a checkpoint may carry that hold no weights: RoPE's cached ``inv_freq`` and
    GPT-2's causal-mask buffers (``attn.bias``, ``attn.masked_bias``)."""
    if family(model_type) == "llama":
        return key.endswith("rotary_emb.inv_freq")
    return key.endswith(("attn.bias", "attn.masked_bias")) and ".c_attn." not in key
