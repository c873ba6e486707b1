"""Next-token sampling (temperature, top-k, nucleus) and streaming generation with a state."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nestlearn.models.base import LanguageModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits [B, V]``; returns ``[B]`` (long).

    ``temperature = 0`` is greedy (argmax; ``top_k``/``top_p`` are then irrelevant). Otherwise
    ``p ∝ exp(logits / temperature)`` restricted to the ``top_k`` largest logits (0 = all), then
    to the nucleus: the smallest set of most likely tokens whose mass is ``>= top_p`` (1 = all),
    which always holds at least the most likely token. Draws use ``generator``.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if temperature == 0:
        return logits.argmax(dim=-1)

    logits = logits.float() / temperature  # [B, V]
    if 0 < top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped once the more likely ones before it already reach top_p; the first
        # token has nothing before it, so it is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        drop = torch.zeros_like(mass_before, dtype=torch.bool)
        drop = drop.scatter(-1, order, mass_before >= top_p)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: LanguageModel,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new token ``[B]`` as soon as it is sampled (streaming).

    ``prompt_ids``: a list of ids (batch 1) or ``[B, T]``. One prefill ``forward`` over the
    prompt from ``model.init_state``, then one single-token ``forward`` per new token, all under
    ``torch.inference_mode`` (active only while the generator runs, not between yields; the
    yielded tensors are inference tensors). Stops after ``max_new_tokens``, after ``eos_id``
    (once every row has produced it; the eos token is yielded), or when the next token could not
    be fed back without exceeding ``model.context_limit`` (``max_seq_len`` for attention; none
    for recurrent models): each token is predicted from at most that many tokens of context, so
    at most ``limit - T + 1`` tokens come out. A prompt longer than the limit raises
    :class:`~nestlearn.errors.SequenceTooLongError`. ``vocab_limit``: only ids below it are
    sampled (a model whose head is wider than its tokenizer, e.g. a converted or padded
    vocabulary, never emits an id the tokenizer cannot decode). ``attention_mask [B, T]``: prompts
    of different lengths, left-padded with zeros (:mod:`nestlearn.models.padding`); each row
    continues exactly as its prompt would alone (in the context limit, ``T`` counts the pads).
    """
    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if tokens.ndim == 1:
        tokens = tokens[None]  # [1, T]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty list of ids or [B, T], got {prompt_ids!r}")
    B, T = tokens.shape
    if max_new_tokens <= 0:
        return
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit={vocab_limit} must be >= 1 (or None for the whole head)")

    limit = model.context_limit
    state = model.init_state(B, device)
    if attention_mask is None:
        logits, state = model(tokens, state)  # [B, T, V]
    else:
        logits, state = model(tokens, state, attention_mask=attention_mask.to(device))
        # each row's last real position (right padding ends a row early)
        last = attention_mask.to(device).long().cumsum(1).argmax(1)  # [B]
        logits = logits[torch.arange(B, device=device), last][:, None]  # [B, 1, V]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for n in range(max_new_tokens):
        last = logits[:, -1, :vocab_limit]  # [B, V'] (V' = V when vocab_limit is None)
        token = sample_next(last, temperature, top_k, top_p, generator)  # [B]
        yield token
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                return
        if n + 1 == max_new_tokens or (limit is not None and T + n + 1 > limit):
            return
        logits, state = model(token[:, None], state)  # [B, 1, V]
