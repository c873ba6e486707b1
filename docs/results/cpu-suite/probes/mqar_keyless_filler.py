"""Probe of HOPE's MQAR P=2 shortfall (docs/results/cpu-suite/README.md): filler tokens that never
hold a key id, in training and test (each such id redrawn among the values).

    python docs/results/cpu-suite/probes/mqar_keyless_filler.py --preset cpu --models hope \
        --seed 0 --threads 1 --no-progress --out /tmp/probe/hope_nokey
"""

from __future__ import annotations

import sys

import torch

import nestlearn.eval.mqar as mqar
import nestlearn.experiments.mqar as experiment
from nestlearn.eval.synthetic import IGNORE
from nestlearn.experiments import run_experiment


def keyless_batch(n, seq_len, n_pairs, vocab_size, generator=None, power_a=mqar.POWER_A):
    """:func:`nestlearn.eval.mqar.mqar_batch` whose filler holds no key id."""
    inputs, targets = mqar.mqar_batch(n, seq_len, n_pairs, vocab_size, generator, power_a)
    half = vocab_size // 2
    filler = torch.zeros_like(inputs, dtype=torch.bool)
    filler[:, 2 * n_pairs :] = targets[:, 2 * n_pairs :] == IGNORE
    redraw = torch.randint(half, vocab_size, inputs.shape, generator=generator)
    inputs = torch.where(filler & (inputs >= 1) & (inputs < half), redraw, inputs)
    return inputs, targets


experiment.mqar_batch = keyless_batch

if __name__ == "__main__":
    sys.exit(run_experiment("mqar", sys.argv[1:]))
