"""Text classification with a language model: score every class name as the continuation.

An example ``x`` with candidate classes ``c_1..c_C`` becomes the prompt ``<eos>… x ␤class:`` and
each class the continuation `` c_k␤``; the prediction is ``argmax_k Σ_t log p(c_k,t | prompt,
c_k,<t)`` (the summed log-probability of the continuation's tokens). Training minimises the
mean negative log-likelihood of the true class's tokens given the prompt (no loss on the prompt).

Every prompt is exactly ``prompt_len`` tokens: the text is cut to fit and the left is padded with
the end-of-text id (which is also what precedes a document in pretraining). Equal lengths let one
batched ``forward`` read all prompts into a decoding state; each class is then scored by
continuing a copy of that state with the class's tokens, so a prompt is read once, not once per
class (cost ``B·P + C·B·L`` tokens instead of ``C·B·(P + L)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.eval.perplexity import upcast
from nestlearn.experiments.model_source import check_context, clone_state
from nestlearn.models.base import LanguageModel

PROMPT_SUFFIX = "\nclass:"


class LabelScorer:
    """Prompts, class continuations, scores and the training loss for one model + tokenizer."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, prompt_len: int = 96) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.suffix = tokenizer.encode(PROMPT_SUFFIX)
        if prompt_len < len(self.suffix) + 2:
            raise ValueError(
                f"prompt_len={prompt_len} leaves no room for text: use at least "
                f"{len(self.suffix) + 2}"
            )
        self.prompt_len = prompt_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, text: str) -> list[int]:
        """``prompt_len`` ids: eos padding, the text's first tokens, then ``␤class:``."""
        room = self.prompt_len - len(self.suffix) - 1  # at least one eos in front
        body = self.tokenizer.encode(text)[:room] + self.suffix
        return [self.tokenizer.eos_id] * (self.prompt_len - len(body)) + body

    def class_ids(self, label: str) -> list[int]:
        return self.tokenizer.encode(f" {label}\n")

    def check_fits(self, labels: Sequence[str]) -> None:
        longest = max(len(self.class_ids(label)) for label in labels)
        check_context(
            self.model,
            self.prompt_len + longest,
            "a prompt and its longest class name",
            "lower --prompt-len",
        )

    def prompts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = [self.prompt_ids(t) for t in texts]
        return torch.tensor(ids, dtype=torch.long, device=self.device)  # [B, P]

    @torch.no_grad()
    def scores(self, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
        """``[B, C]`` float64: log p(class k's continuation | prompt of text b)."""
        prompts = self.prompts(texts)
        B = prompts.shape[0]
        state = self.model.init_state(B, self.device)
        logits, state = self.model(prompts, state)
        first = F.log_softmax(upcast(logits[:, -1]), dim=-1)  # [B, V]
        out = torch.empty(B, len(labels), dtype=torch.float64, device=self.device)
        for k, label in enumerate(labels):
            ids = torch.tensor(self.class_ids(label), device=self.device)
            total = first[:, ids[0]].double()
            if len(ids) > 1:
                rest, _ = self.model(ids[:-1].expand(B, -1), clone_state(state))
                logp = F.log_softmax(upcast(rest), dim=-1)  # [B, L-1, V]
                total = total + logp.gather(-1, ids[1:].expand(B, -1)[..., None]).sum((1, 2))
            out[:, k] = total
        return out

    def predict(
        self, texts: Sequence[str], labels: Sequence[str], batch_size: int = 32
    ) -> list[int]:
        """Index into ``labels`` of the best-scoring class of each text (eval mode inside)."""
        was_training = self.model.training
        self.model.eval()
        try:
            preds: list[int] = []
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                preds += self.scores(batch, labels).argmax(-1).tolist()
        finally:
            self.model.train(was_training)
        return preds

    def loss(self, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
        """Mean NLL per class token of the true classes ``labels[b]`` after prompts ``texts[b]``."""
        rows = [self.prompt_ids(t) + self.class_ids(c) for t, c in zip(texts, labels, strict=True)]
        width = max(map(len, rows))
        eos = self.tokenizer.eos_id
        tokens = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=self.device)
        targets = tokens[:, 1:].clone()
        # Positions before the class (the prompt) and after it (padding) carry no loss.
        targets[:, : self.prompt_len - 1] = -100
        for b, row in enumerate(rows):
            targets[b, len(row) - 1 :] = -100
        logits, _ = self.model(tokens[:, :-1])
        return F.cross_entropy(
            upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
