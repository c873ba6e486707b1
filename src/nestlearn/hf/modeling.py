"""``NestlearnForCausalLM``: any nestlearn language model behind the Hugging Face interfaces.

The wrapper holds the nestlearn model as ``self.model`` (weights ``model.*`` in
``model.safetensors``) and adds what ``transformers`` expects of a causal LM:
``forward(input_ids, labels=...) -> CausalLMOutputWithPast`` with the shifted next-token loss,
``save_pretrained`` / ``from_pretrained`` (safetensors; a tied head is stored once) and
``generate()``.

The cache of ``generate()`` is the model's own decoding state (SPEC §2.3, recurrent form) in a
:class:`~nestlearn.hf.cache.NestlearnCache`, a ``transformers`` ``Cache``: greedy, sampling, beam
search and assisted decoding work (beams reorder the state's rows; a rollback re-reads the kept
tokens). The interface follows ``transformers`` 5's own causal LMs (Llama): the cache argument and
output field are ``cache`` (``past_key_values`` is accepted with ``transformers``' deprecation
warning), ``output_hidden_states`` returns ``n_layers + 1`` states
(:mod:`nestlearn.hf.hidden_states`) and ``resize_token_embeddings`` resizes the embedding and
head, tied or not. See docs/huggingface.md.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from nestlearn.hf.cache import NestlearnCache
from nestlearn.hf.configuration import NestlearnConfig
from nestlearn.hf.hidden_states import hidden_states, recording_blocks
from nestlearn.models.base import LanguageModel

# transformers >= 5.x names the cache ``cache``; earlier 5.x releases ``past_key_values``.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


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
        an error; a nestlearn run folder or ``checkpoints/step_*`` folder loads directly.

        (The generic loader would leave such a weight uninitialized and only warn.)
        """
        from nestlearn.errors import CheckpointError
        from nestlearn.hf.run_folder import from_run_folder, is_run_folder

        if args and is_run_folder(args[0]):
            return from_run_folder(cls, args[0], **kwargs)
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

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        """``transformers``' save, plus the remote code (:mod:`nestlearn.hf.remote_code`):
        ``modeling_nestlearn.py`` and ``config.auto_map``, so that the folder loads with
        ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` in any process
        where nestlearn is installed."""
        from nestlearn.hf.remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        return result

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Nothing: ``transformers`` calls this after loading remote code, to copy the class's
        source file on the next save; nestlearn folders carry their own small module instead
        (:meth:`save_pretrained`)."""


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

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.head = value

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """``transformers``' resize (embedding rows and head outputs added or removed at the
        end, the head re-tied to the embedding when ``tie_embeddings``), then the nestlearn
        config (``config.nestlearn``, ``model.config``) takes the new ``vocab_size``, so
        ``save_pretrained`` / ``from_pretrained`` rebuild the resized model."""
        embeddings = super().resize_token_embeddings(
            new_num_tokens, pad_to_multiple_of, mean_resizing
        )
        vocab_size = int(embeddings.weight.shape[0])
        self.config.nestlearn["vocab_size"] = vocab_size
        self.model.config = dataclasses.replace(self.model.config, vocab_size=vocab_size)
        return embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kw):
        """``generate()``'s cache: an empty :class:`NestlearnCache` that the first forward fills
        (a user's cache is kept). Assisted decoding needs it before the first forward."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kw)
        if model_kwargs.get(_CACHE_FIELD) is None and generation_config.use_cache is not False:
            model_kwargs[_CACHE_FIELD] = NestlearnCache()
            if getattr(generation_config, "is_assistant", False):
                model_kwargs[_CACHE_FIELD].activate_past_recording()

    def _reread(self, tokens: torch.Tensor, state):
        """The model over ``tokens`` from ``state``, no padding (a rollback's re-read)."""
        return self.model(tokens, state)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[B, T, vocab]`` for ``input_ids [B, T]``, continuing ``cache``.

        A given ``cache`` is continued and updated in place; ``use_cache`` (default: whether a
        cache was given) returns it, or a new :class:`NestlearnCache` holding the state after
        the last token.
        ``output_hidden_states`` adds the ``n_layers + 1`` states ``[B, T, d_model]`` of
        :mod:`nestlearn.hf.hidden_states`. ``labels [B, T]`` (``-100`` = ignored) give the loss
        ``mean_t CE(logits[:, t], labels[:, t + 1])``, shifted inside as in ``transformers``;
        with ``num_items_in_batch`` the sum is divided by it instead (gradient accumulation).
        ``attention_mask`` (``[B, T]``, or ``[B, past + T]`` as ``generate()`` passes it: its last
        ``T`` columns apply) marks padding with zeros, left or right, no holes: each row's logits
        at real positions and its cache equal those of the row run alone unpadded
        (:mod:`nestlearn.models.padding`, docs/padding.md).
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by nestlearn models; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required: token ids [batch, seq_len]")
        if attention_mask is not None:
            # generate() passes the mask of the whole stream; this call's tokens are its end.
            attention_mask = attention_mask[:, -input_ids.shape[1] :]
        cache = _nestlearn_cache(cache, kwargs.pop("past_key_values", None))
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            cache = NestlearnCache()
        if output_attentions:
            raise ValueError(
                "output_attentions is not supported: most nestlearn models have no attention "
                "weights; use output_hidden_states"
            )
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)

        state = None
        if cache is not None:
            state = cache.begin(input_ids, self._reread, self.model.init_state)
        with recording_blocks(self.model) if output_hidden_states else nullcontext() as passes:
            logits, state = self.model(input_ids, state, attention_mask=attention_mask)
        if cache is not None:
            cache.advance(input_ids, state)
        states = None
        if output_hidden_states:
            states = hidden_states(self.model, passes, input_ids, attention_mask)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=states,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


def _nestlearn_cache(cache: Cache | None, legacy: Cache | None) -> NestlearnCache | None:
    """The forward's cache argument as a :class:`NestlearnCache` (or None).

    ``legacy`` is ``past_key_values``, the pre-``cache`` name: accepted, with ``transformers``'
    own deprecation warning where ``transformers`` has renamed it. An empty ``transformers``
    cache (a ``DynamicCache`` made by another ``generate()``) means "start fresh"; a filled one
    cannot hold a nestlearn state.
    """
    if legacy is not None:
        if cache is not None:
            raise ValueError("pass the cache once, as cache= (past_key_values is its old name)")
        if _CACHE_FIELD == "cache":
            warnings.warn(
                "`past_key_values` is deprecated, use `cache` instead (as in transformers' "
                "own models)",
                FutureWarning,
                stacklevel=3,
            )
        cache = legacy
    if cache is None or isinstance(cache, NestlearnCache):
        return cache
    if isinstance(cache, Cache) and cache.get_seq_length() == 0:
        return NestlearnCache()
    raise ValueError(
        f"cache is a {type(cache).__name__}; nestlearn models continue from a NestlearnCache "
        "(returned by a forward with use_cache=True, or NestlearnCache() to start one)"
    )


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
