"""The three requests of lm-evaluation-harness, answered by a nestlearn model + tokenizer.

This module does not import ``lm_eval``: a request is anything with ``.args`` (lm-eval's
``Instance``) or a plain tuple of the same arguments, so the maths is testable without it.
:mod:`nestlearn.experiments.zero_shot` mixes :class:`LMScorer` into lm-eval's ``LM`` class.

- ``loglikelihood((context, continuation))`` -> ``(Σ_t log p(cont_t | eos, context, cont_<t),
  is_greedy)``: trailing spaces of the context move to the continuation and the continuation's
  tokens are those of ``encode(context + continuation)`` after ``encode(context)`` (lm-eval's own
  convention); the end-of-text id stands first, as at the start of every training document.
  ``is_greedy``: every continuation token is the argmax.
- ``loglikelihood_rolling((text,))`` -> ``Σ_t log p(text_t | eos, text_<t)``, every token scored
  once. Recurrent models (no context limit) read the text in windows, carrying their state, so
  any length costs constant memory; attention models score it in windows of their context limit,
  each window's targets predicted from the ``limit`` tokens before them.
- ``generate_until((context, {"until": [...], "max_gen_toks": N}))`` -> greedy text up to the
  first stop string (excluded), at most ``max_gen_toks`` tokens.

Inputs longer than an attention model's limit keep their last ``limit`` tokens (lm-eval's rule);
a continuation that alone exceeds it raises :class:`~nestlearn.errors.SequenceTooLongError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.errors import SequenceTooLongError
from nestlearn.eval.perplexity import upcast
from nestlearn.models.base import LanguageModel
from nestlearn.models.sampling import generate


def request_args(request: Any) -> tuple:
    """lm-eval's ``Instance.args``, or the request itself when it is a tuple."""
    args = getattr(request, "args", request)
    return tuple(args) if isinstance(args, (list, tuple)) else (args,)


class LMScorer:
    """Log-likelihoods and greedy generations of a model (eval mode, no gradients)."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        batch_size: int = 16,
        max_gen_toks: int = 256,
        window: int = 2048,
    ) -> None:
        if batch_size <= 0 or max_gen_toks <= 0 or window <= 0:
            raise ValueError("batch_size, max_gen_toks and window must be > 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.window = window

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        return self.model.context_limit

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(eos + context ids, continuation ids)`` by lm-eval's convention (module docstring)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx) :]
        if not cont:
            raise ValueError(f"empty continuation after context {context[-40:]!r}")
        return [self.tokenizer.eos_id, *ctx], cont

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request_args(r)[:2]) for r in requests]
        limit = self.max_length
        rows = []
        for ctx, cont in pairs:
            if limit is not None and len(cont) > limit:
                raise SequenceTooLongError(
                    f"a continuation of {len(cont)} tokens exceeds the model's context limit "
                    f"{limit}; use a model with a larger model.max_seq_len"
                )
            inputs = (ctx + cont)[:-1]
            rows.append((inputs if limit is None else inputs[-limit:], cont))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        # Longest first, so that batches hold rows of similar length (less padding).
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            eos = self.tokenizer.eos_id
            tokens = torch.tensor(
                [rows[i][0] + [eos] * (width - len(rows[i][0])) for i in batch], device=self.device
            )
            logp = F.log_softmax(upcast(self.model(tokens)[0]), dim=-1)  # [B, T, V]
            for b, i in enumerate(batch):
                inputs, cont = rows[i]
                end = len(inputs)
                target = torch.tensor(cont, device=self.device)
                scores = logp[b, end - len(cont) : end]  # [C, V]
                total = scores.gather(-1, target[:, None]).sum()
                greedy = bool((scores.argmax(-1) == target).all())
                results[i] = (float(total), greedy)
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        return [self.rolling_logprob(request_args(r)[0]) for r in requests]

    def rolling_logprob(self, text: str) -> float:
        ids = self.tokenizer.encode(text)
        if not ids:
            return 0.0
        full = torch.tensor([self.tokenizer.eos_id, *ids], device=self.device)  # full[k] -> ids[k]
        targets = full[1:]
        n, limit, total = len(ids), self.max_length, 0.0
        if limit is None:
            state = self.model.init_state(1, self.device)
            for s in range(0, n, self.window):
                logits, state = self.model(full[None, s : min(s + self.window, n)], state)
                logp = F.log_softmax(upcast(logits[0]), dim=-1)
                total += float(logp.gather(-1, targets[s : s + self.window, None]).sum())
            return total
        for s in range(0, n, limit):
            e = min(s + limit, n)
            a = max(0, e - limit)
            logits, _ = self.model(full[None, a:e])
            logp = F.log_softmax(upcast(logits[0, s - a :]), dim=-1)  # predicts ids[s:e]
            total += float(logp.gather(-1, targets[s:e, None]).sum())
        return total

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        return [self.generate_one(*request_args(r)[:2]) for r in requests]

    def generate_one(self, context: str, gen_kwargs: dict | None = None) -> str:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
        if self.max_length is not None:
            ids = ids[-max(1, self.max_length - max_new) :]
        new: list[int] = []
        text = ""
        stream = generate(self.model, ids, max_new, temperature=0.0, eos_id=self.tokenizer.eos_id)
        for token in stream:
            if int(token[0]) == self.tokenizer.eos_id:
                break
            new.append(int(token[0]))
            text = self.tokenizer.decode(new)
            if any(stop in text for stop in until):
                break
        cut = min((text.find(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]
