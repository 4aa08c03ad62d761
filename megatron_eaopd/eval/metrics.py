"""Evaluation metrics: Avg@k, Pass@k, high-entropy token fraction, FKL on high-entropy tokens.

Pass@k uses the unbiased estimator of Chen et al. (2021): with ``n`` samples of which ``c`` are
correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, the probability that a random size-k subset of the
samples holds at least one correct one. It is computed as a product, never with large binomials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

__all__ = [
    "EntropyStats",
    "avg_at_k",
    "high_entropy_fkl",
    "high_entropy_fraction",
    "pass_at_k",
    "pass_at_k_estimate",
    "summarize_samples",
]


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples, ``c`` of them correct.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _as_lists(results: Iterable[Sequence[bool]]) -> list[list[bool]]:
    rows = [[bool(x) for x in r] for r in results]
    if not rows:
        raise ValueError("no prompts to score")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one sample")
    return rows


def pass_at_k(results: Iterable[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over prompts; ``results[i]``: correctness of prompt i's samples."""
    rows = _as_lists(results)
    return sum(pass_at_k_estimate(len(r), sum(r), k) for r in rows) / len(rows)


def avg_at_k(results: Iterable[Sequence[bool]]) -> float:
    """Avg@k: the mean accuracy over all samples, averaged per prompt first (k = samples/prompt)."""
    rows = _as_lists(results)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


def _masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.reshape(-1)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    return values[mask.bool()]


def high_entropy_fraction(
    entropy: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 0.8
) -> float:
    """Fraction of valid tokens whose entropy is at least ``threshold`` (>=, the loss gate's
    default, ``loss.gate_strict: false``).

    Args:
        entropy: per-token entropies in nats, any shape (e.g. ``[s, b]``).
        mask: same shape; nonzero marks valid (response) tokens; None: all tokens count.
        threshold: tau, in nats.

    Returns:
        The fraction in [0, 1]; NaN when there are no valid tokens.
    """
    vals = _masked(entropy, mask)
    if vals.numel() == 0:
        return float("nan")
    return (vals >= threshold).double().mean().item()


def high_entropy_fkl(
    fkl: torch.Tensor,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    threshold: float = 0.8,
) -> dict[str, float]:
    """Aggregate a per-token forward KL(teacher || student) over the teacher's high-entropy tokens.

    Args:
        fkl: per-token forward KL in nats.
        teacher_entropy: the teacher's per-token entropy (same shape).
        mask: valid-token mask (same shape) or None.
        threshold: tau; a token is high-entropy when ``teacher_entropy >= threshold`` (the loss's
            default gate).

    Returns:
        ``fkl_high`` (mean over high-entropy tokens; NaN if none), ``fkl_low`` (mean over the other
        valid tokens), ``fkl_all`` (mean over valid tokens), and the token counts ``n_high``,
        ``n_valid`` (so results from several batches can be merged by weighting).
    """
    if fkl.shape != teacher_entropy.shape:
        raise ValueError(
            f"fkl {tuple(fkl.shape)} and entropy {tuple(teacher_entropy.shape)} differ"
        )
    f = _masked(fkl, mask).double()
    h = _masked(teacher_entropy, mask)
    high = h >= threshold

    def mean(x: torch.Tensor) -> float:
        return x.mean().item() if x.numel() else float("nan")

    return {
        "fkl_high": mean(f[high]),
        "fkl_low": mean(f[~high]),
        "fkl_all": mean(f),
        "n_high": int(high.sum().item()),
        "n_valid": int(f.numel()),
    }


def summarize_samples(
    results: Mapping[str, Sequence[Sequence[bool]]], ks: Sequence[int] = (1, 8)
) -> dict[str, float]:
    """Avg@k and Pass@k per eval set and their mean over sets, as a flat metrics dict.

    ``results[set_name][i]`` holds the correctness of prompt i's samples; Pass@k is reported for
    each k in ``ks`` not larger than the fewest samples of any prompt.
    """
    out: dict[str, float] = {}
    per_set: dict[str, dict[str, float]] = {}
    for name, rows in results.items():
        n_min = min(len(r) for r in rows) if len(rows) else 0
        m = {f"avg@{n_min}": avg_at_k(rows)}
        for k in ks:
            if k <= n_min:
                m[f"pass@{k}"] = pass_at_k(rows, k)
        per_set[name] = m
        out.update({f"{name}/{key}": v for key, v in m.items()})
    keys = set.intersection(*(set(m) for m in per_set.values())) if per_set else set()
    for key in sorted(keys):
        out[f"mean/{key}"] = sum(m[key] for m in per_set.values()) / len(per_set)
    return out


@dataclass
class EntropyStats:
    """Running sums for the entropy metrics over many batches (and ranks).

    ``update`` adds a batch; ``to_tensor``/``from_tensor`` pack the sums into one float64 tensor
    for a single SUM all-reduce; ``summary`` gives the metrics: the student's and the teacher's
    fraction of tokens with entropy >= tau on the same tokens, and the forward KL averaged over the
    teacher's high-entropy tokens and over all tokens.
    """

    n_valid: float = 0.0
    n_student_high: float = 0.0
    n_teacher_high: float = 0.0
    fkl_sum_high: float = 0.0
    fkl_sum: float = 0.0

    def update(
        self,
        student_entropy: torch.Tensor,
        teacher_entropy: torch.Tensor,
        mask: torch.Tensor | None,
        threshold: float,
        fkl: torch.Tensor | None = None,
    ) -> EntropyStats:
        """Add one batch of per-token values (same shapes; ``mask`` marks valid tokens)."""
        if student_entropy.shape != teacher_entropy.shape:
            raise ValueError("student and teacher entropies differ in shape")
        hs = _masked(student_entropy, mask).double()
        ht = _masked(teacher_entropy, mask).double()
        high = ht >= threshold
        self.n_valid += hs.numel()
        self.n_student_high += (hs >= threshold).sum().item()
        self.n_teacher_high += high.sum().item()
        if fkl is not None:
            f = _masked(fkl, mask).double()
            self.fkl_sum_high += f[high].sum().item()
            self.fkl_sum += f.sum().item()
        return self

    def __add__(self, other: EntropyStats) -> EntropyStats:
        return EntropyStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The sums as a float64 tensor (all-reduce it with SUM, then :meth:`from_tensor`)."""
        return torch.tensor(
            [getattr(self, f.name) for f in fields(self)], dtype=torch.float64, device=device
        )

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> EntropyStats:
        """Inverse of :meth:`to_tensor`."""
        return cls(*(float(x) for x in t.tolist()))

    def summary(self) -> dict[str, float]:
        """``student_high_frac``, ``teacher_high_frac``, ``fkl_high``, ``fkl_all`` (NaN: empty)."""

        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        return {
            "student_high_frac": ratio(self.n_student_high, self.n_valid),
            "teacher_high_frac": ratio(self.n_teacher_high, self.n_valid),
            "fkl_high": ratio(self.fkl_sum_high, self.n_teacher_high),
            "fkl_all": ratio(self.fkl_sum, self.n_valid),
        }
