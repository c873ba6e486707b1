"""Probe of HOPE's MQAR P=2 shortfall (docs/results/cpu-suite/README.md): train as the experiment
does, then test only on queries at token 8 or later (after the fastest CMS level's first update).

    python docs/results/cpu-suite/probes/mqar_late_queries.py --preset cpu --models hope \
        --seed 0 --threads 1 --no-progress --out /tmp/probe/hope_late

Training batches keep Zoology's layout; only the test batches (``--test-examples 256``, told
apart by their size) draw their query gaps with the early positions removed.
"""

from __future__ import annotations

import sys

import torch

import nestlearn.eval.mqar as mqar
import nestlearn.experiments.mqar as experiment
from nestlearn.eval.synthetic import IGNORE
from nestlearn.experiments import run_experiment

FIRST = 8  # the first query position kept: the fast CMS level's chunk (cms_chunk_sizes [16, 8])
TEST_N = 256


def late_batch(n, seq_len, n_pairs, vocab_size, generator=None, power_a=mqar.POWER_A):
    """:func:`nestlearn.eval.mqar.mqar_batch` with no query before token ``FIRST``."""
    mqar.check_mqar(seq_len, n_pairs, vocab_size)
    half, ctx = vocab_size // 2, 2 * n_pairs
    space = (seq_len - ctx) // 2
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :n_pairs] + 1
    values = torch.rand(n, vocab_size - half, generator=generator).argsort(dim=1)[:, :n_pairs]
    values = values + half
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    weights[ctx + 2 * torch.arange(space) < FIRST] = 0.0
    gaps = torch.multinomial(weights.expand(n, space), n_pairs, generator=generator)
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=generator)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    query_pos = ctx + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


original = experiment.mqar_batch
experiment.mqar_batch = lambda n, *a, **k: (late_batch if n == TEST_N else original)(n, *a, **k)

if __name__ == "__main__":
    sys.exit(run_experiment("mqar", [*sys.argv[1:], "--test-examples", str(TEST_N)]))
