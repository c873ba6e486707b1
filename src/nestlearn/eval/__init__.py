"""Evaluation: perplexity, bits per byte, baselines; the protocols of the experiments.

Submodules: ``streaming`` (sliding-window and streaming perplexity), ``mqar`` (multi-query
associative recall), ``niah`` (needle in a haystack), ``synthetic`` (training small models on
synthetic tasks), ``results`` / ``figures`` / ``records`` (the files experiments read and write).
"""

from nestlearn.eval.perplexity import evaluate_lm, metrics_from_sums, unigram_metrics
from nestlearn.eval.streaming import sliding_nll, stream_perplexity, streaming_nll

__all__ = [
    "evaluate_lm",
    "metrics_from_sums",
    "sliding_nll",
    "stream_perplexity",
    "streaming_nll",
    "unigram_metrics",
]
