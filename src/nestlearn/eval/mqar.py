"""Multi-query associative recall (MQAR), the Zoology protocol (Arora et al., 2023; SPEC §6).

A sequence of length ``T`` holds ``P`` key-value pairs, then queries. The vocabulary of ``V`` ids
is split in half: keys are drawn from ``[1, V/2)`` and values from ``[V/2, V)``, each without
replacement within a sequence. Layout::

    k_1 v_1 k_2 v_2 ... k_P v_P | x x k_3 x x x k_1 x ... (T - 2P tokens)

The ``2P`` pair tokens come first. In the remaining ``T - 2P`` positions every key is asked once,
at an even offset ``2g`` with gaps ``g`` drawn without replacement from ``{0 .. (T-2P)/2 - 1}``
with ``p(g) ∝ (g+1)^(a-1)``, ``a = 0.01`` (short gaps are likelier, as in Zoology). All other
positions hold uniformly random ids of the whole vocabulary. The target at a query position is
its key's value (the next-token prediction there); every other target is ``IGNORE`` and is not
scored. Accuracy is the share of query positions where the argmax of the logits is the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from nestlearn.eval.synthetic import IGNORE, masked_loss

POWER_A = 0.01  # Zoology's power-law exponent for the query gaps


def check_mqar(seq_len: int, n_pairs: int, vocab_size: int) -> None:
    """Raise ValueError (naming the fix) unless ``(T, P, V)`` is a valid MQAR setting."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs={n_pairs} must be >= 1")
    if seq_len % 2 or seq_len < 4 * n_pairs:
        raise ValueError(
            f"seq_len={seq_len} must be even and >= 4 * n_pairs = {4 * n_pairs} (pairs take "
            "2P tokens and the P queries need (T - 2P)/2 >= P even slots); raise seq_len or "
            "lower n_pairs"
        )
    if vocab_size // 2 - 1 < n_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} gives {vocab_size // 2 - 1} distinct keys, fewer than "
            f"n_pairs={n_pairs}; use vocab_size >= {2 * n_pairs + 2}"
        )


def mqar_batch(
    n: int,
    seq_len: int,
    n_pairs: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    power_a: float = POWER_A,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR sequences: ``inputs`` and ``targets``, both int64 ``[n, seq_len]``.

    ``targets[b, t]`` is the value to predict after reading ``inputs[b, :t+1]`` at the ``P``
    query positions of row ``b`` and ``IGNORE`` elsewhere.
    """
    check_mqar(seq_len, n_pairs, vocab_size)
    half = vocab_size // 2
    ctx = 2 * n_pairs
    space = (seq_len - ctx) // 2
    # Distinct keys and values per row: the first P of a random permutation of each range.
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :n_pairs] + 1
    values = torch.rand(n, vocab_size - half, generator=generator).argsort(dim=1)[:, :n_pairs]
    values = values + half
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(n, space), n_pairs, generator=generator)  # [n, P]
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=generator)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    query_pos = ctx + 2 * gaps  # [n, P]
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


@torch.no_grad()
def mqar_accuracy(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``{"accuracy", "loss", "queries"}`` over the scored (non-``IGNORE``) positions.

    ``loss`` is the mean cross-entropy in nats at those positions (``ln V`` for uniform logits).
    """
    was_training = model.training
    model.eval()
    correct, total, nll = 0, 0, 0.0
    try:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            logits, _ = model(inputs)
            scored = targets != IGNORE
            n = int(scored.sum())
            correct += int((logits.argmax(-1)[scored] == targets[scored]).sum())
            nll += float(masked_loss(logits, targets)) * n
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("no scored positions: the targets are all IGNORE")
    return {"accuracy": correct / total, "loss": nll / total, "queries": total}


def chance_accuracy(vocab_size: int) -> float:
    """Accuracy of a guess drawn uniformly from the whole vocabulary."""
    return 1.0 / vocab_size


def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy of uniform logits: ``ln V``."""
    return math.log(vocab_size)
