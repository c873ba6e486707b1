"""``NestlearnForCausalLM``: any nestlearn language model behind the Hugging Face interfaces.

The wrapper holds the nestlearn model as ``self.model`` (weights ``model.*`` in
``model.safetensors``) and adds what ``transformers`` expects of a causal LM:
``forward(input_ids, labels=...) -> CausalLMOutputWithPast`` with the shifted next-token loss,
``save_pretrained`` / ``from_pretrained`` (safetensors; a tied head is stored once) and
``generate()``.

The cache of ``generate()`` is the model's own decoding state (SPEC §2.3, recurrent form), the
``dict[str, Tensor]`` of :meth:`~nestlearn.models.base.LanguageModel.init_state` wrapped in a
:class:`NestlearnCache`: a KV cache for the Transformer, memory weights and short-conv windows for
the memory models. The model is *stateful* in the ``transformers`` sense: its cache cannot be
cropped or rolled back, so assisted (speculative) decoding is refused, while greedy, sampling and
beam search work (beams reorder the state's batch rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from nestlearn.hf.configuration import NestlearnConfig
from nestlearn.models.base import LanguageModel, State


class NestlearnCache:
    """A nestlearn decoding state as a ``generate()`` cache.

    ``state["pos"]`` (0-d) counts the tokens seen; every other tensor of rank >= 1 has the batch
    as its first dimension (the :class:`~nestlearn.models.base.LanguageModel` state contract).
    """

    is_compileable = False  # generate() must not auto-compile around it
    is_croppable = False  # a recurrent memory cannot forget its last tokens

    def __init__(self, state: State) -> None:
        if "pos" not in state:
            raise ValueError("a nestlearn state has a 'pos' entry; make one with model.init_state")
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already read into the state."""
        return int(self.state["pos"])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` (beam search), in place."""
        self.state = {
            key: value if value.ndim == 0 else value.index_select(0, beam_idx.to(value.device))
            for key, value in self.state.items()
        }

    def __repr__(self) -> str:
        return f"NestlearnCache(pos={self.get_seq_length()}, tensors={len(self.state)})"


class NestlearnPreTrainedModel(PreTrainedModel):
    """Loading rules shared by nestlearn wrappers.

    The nestlearn model initializes itself when built, so ``transformers``' generic weight init
    is switched off, and the model is built on a real device instead of ``meta``: its
    non-persistent buffers (RoPE tables, ...) are computed in ``__init__`` and never saved, and
    are restored from that first computation after loading (:meth:`from_pretrained`).
    """

    config_class = NestlearnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand us a DynamicCache: the first forward creates a NestlearnCache.
        return False

    def _snapshot_buffers(self) -> None:
        """Remember every non-persistent buffer's freshly computed value (not saved to disk)."""
        self._buffer_init: dict[int, dict[str, torch.Tensor]] = {}
        for module in self.modules():
            names = getattr(module, "_non_persistent_buffers_set", ())
            values = {n: module._buffers[n].detach().clone() for n in names if n in module._buffers}
            if values:
                self._buffer_init[id(module)] = values

    def _init_weights(self, module: nn.Module) -> None:
        # The nestlearn model initialized itself when built; a load overwrites every weight
        # (missing ones are an error, see from_pretrained).
        pass

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        for module in self.modules():
            for name, value in self._buffer_init.get(id(module), {}).items():
                module._buffers[name].copy_(value)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``transformers``' loader, except that a missing, unexpected or mis-shaped weight is
        an error.

        (The generic loader would leave such a weight uninitialized and only warn.)
        """
        from nestlearn.errors import CheckpointError

        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = [
            str(k[0] if isinstance(k, tuple) else k)
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            for k in sorted(info.get(kind, ()), key=str)
        ]
        if bad:
            raise CheckpointError(
                f"{args[0] if args else 'checkpoint'}: weights {bad[:3]} are missing, unexpected "
                "or of the wrong shape for the config.json beside them; save the model again "
                "with save_pretrained"
            )
        # The loader leaves non-persistent buffers uninitialized (they are not in the file).
        model._restore_buffers()
        return (model, info) if want_info else model


class NestlearnForCausalLM(NestlearnPreTrainedModel, GenerationMixin):
    """A nestlearn :class:`~nestlearn.models.base.LanguageModel` as a ``transformers`` causal LM.

    ``NestlearnForCausalLM(config)`` builds the architecture ``config.nestlearn["name"]``;
    ``NestlearnForCausalLM(config, model=m)`` wraps an existing model (weights shared).
    """

    def __init__(self, config: NestlearnConfig, model: LanguageModel | None = None) -> None:
        super().__init__(config)
        if model is None:
            from nestlearn.models.registry import build_model

            model = build_model(config.to_model_config())
        self.model = model
        # Tied weights (the head sharing the embedding) are saved once and re-tied on load.
        self._tied_weights_keys = _aliases(model, prefix="model.")
        self._snapshot_buffers()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: NestlearnCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, vocab]`` for ``input_ids [B, T]``, continuing ``past_key_values``.

        ``use_cache`` (default: whether a cache was given) returns the state after the last
        token as ``past_key_values``. ``labels [B, T]`` (``-100`` = ignored) give the loss
        ``mean_t CE(logits[:, t], labels[:, t + 1])``, shifted inside as in ``transformers``;
        with ``num_items_in_batch`` the sum is divided by it instead (gradient accumulation).
        ``attention_mask`` must be all ones: padding is not supported (a recurrent memory would
        read the pad tokens).
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by nestlearn models; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required: token ids [batch, seq_len]")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError(
                "attention_mask has zeros: nestlearn models do not support padding (a recurrent "
                "memory would read the pad tokens); batch sequences of equal length instead"
            )
        if isinstance(past_key_values, Cache):
            # An empty transformers cache (generate() of another version may create one) means
            # "start fresh"; a filled one cannot hold a nestlearn state.
            if past_key_values.get_seq_length() > 0:
                raise ValueError(
                    f"past_key_values is a {type(past_key_values).__name__}; nestlearn models "
                    "continue from a NestlearnCache (returned by a forward with use_cache=True)"
                )
            past_key_values = None
        if use_cache is None:
            use_cache = past_key_values is not None

        state = None
        if past_key_values is not None:
            state = past_key_values.state
        elif use_cache:
            state = self.model.init_state(input_ids.shape[0], input_ids.device)
        logits, state = self.model(input_ids, state)
        cache = NestlearnCache(state) if use_cache else None

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


def _aliases(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """``{alias: first name}`` for every parameter registered under more than one name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[prefix + name] = prefix + first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[:, t + 1]``.

    Half-precision logits are upcast to float32. The mean runs over labels ``!= ignore_index``;
    with ``num_items_in_batch`` the sum is divided by that count instead (``transformers``'
    ``ForCausalLMLoss`` convention for gradient accumulation).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [batch, seq_len] = {tuple(logits.shape[:2])}, got "
            f"{tuple(labels.shape)}; pass the input ids themselves (they are shifted inside)"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B·(T-1), V]
    target = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
