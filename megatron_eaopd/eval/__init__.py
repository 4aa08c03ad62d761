"""Evaluation: Avg@k / Pass@k, entropy statistics, answer checking and plots."""

from megatron_eaopd.data.answers import check_answer, extract_boxed
from megatron_eaopd.eval.metrics import (
    EntropyStats,
    avg_at_k,
    high_entropy_fkl,
    high_entropy_fraction,
    pass_at_k,
    pass_at_k_estimate,
    summarize_samples,
)
from megatron_eaopd.eval.plot import matplotlib_available, plot_curves

__all__ = [
    "EntropyStats",
    "avg_at_k",
    "check_answer",
    "extract_boxed",
    "high_entropy_fkl",
    "high_entropy_fraction",
    "matplotlib_available",
    "pass_at_k",
    "pass_at_k_estimate",
    "plot_curves",
    "summarize_samples",
]
