"""Evaluation: perplexity, bits per byte, baselines."""

from nestlearn.eval.perplexity import evaluate_lm, metrics_from_sums, unigram_metrics

__all__ = ["evaluate_lm", "metrics_from_sums", "unigram_metrics"]
