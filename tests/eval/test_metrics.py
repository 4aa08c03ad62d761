"""Avg@k / Pass@k against brute-force enumeration; entropy-fraction and high-entropy FKL metrics."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from megatron_eaopd.eval import (
    EntropyStats,
    avg_at_k,
    high_entropy_fkl,
    high_entropy_fraction,
    matplotlib_available,
    pass_at_k,
    pass_at_k_estimate,
    plot_curves,
    summarize_samples,
)


def _brute_pass_at_k(samples: list[bool], k: int) -> Fraction:
    """Fraction of all size-k subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(samples)), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_equals_subset_enumeration(n):
    rng = random.Random(n)
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        rng.shuffle(samples)
        for k in range(1, n + 1):
            expected = _brute_pass_at_k(samples, k)
            assert pass_at_k_estimate(n, c, k) == pytest.approx(float(expected), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # where binomials overflow floats: compare with exact integer arithmetic
    n, c, k = 2000, 7, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k_estimate(n, c, k) == pytest.approx(float(exact), rel=1e-9)


def test_mean_over_prompts_and_avg_at_k():
    rng = random.Random(0)
    results = [[rng.random() < p for _ in range(8)] for p in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3)]
    for k in (1, 4, 8):
        expected = sum(_brute_pass_at_k(r, k) for r in results) / len(results)
        assert pass_at_k(results, k) == pytest.approx(float(expected), abs=1e-12)
    expected_avg = sum(Fraction(sum(r), len(r)) for r in results) / len(results)
    assert avg_at_k(results) == pytest.approx(float(expected_avg), abs=1e-12)
    # pass@1 is the mean accuracy
    assert pass_at_k(results, 1) == pytest.approx(avg_at_k(results), abs=1e-12)


def test_pass_at_k_errors():
    with pytest.raises(ValueError):
        pass_at_k_estimate(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k_estimate(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k([], 1)
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def _entropy_py(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_high_entropy_fraction_against_python():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11, dtype=torch.float64) * torch.rand(6, 5, 1) * 4
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * probs.log()).sum(-1)
    mask = torch.rand(6, 5) > 0.3
    for tau in (0.5, 0.8, 1.5, 2.0):
        count = valid = 0
        for s in range(6):
            for b in range(5):
                if mask[s, b]:
                    valid += 1
                    count += _entropy_py(probs[s, b].tolist()) >= tau
        assert high_entropy_fraction(entropy, mask, tau) == pytest.approx(count / valid, abs=1e-12)
    assert high_entropy_fraction(entropy, None, 0.0) == 1.0
    assert math.isnan(high_entropy_fraction(entropy, torch.zeros_like(mask), 0.8))
    # a token exactly at tau is counted (the loss's default gate is H >= tau)
    assert high_entropy_fraction(torch.tensor([0.79999, 0.8, 0.80001]), None, 0.8) == 2 / 3


def test_high_entropy_fkl_against_python():
    torch.manual_seed(1)
    t = torch.softmax(torch.randn(7, 3, 9, dtype=torch.float64) * 2, -1)
    s = torch.softmax(torch.randn(7, 3, 9, dtype=torch.float64) * 2, -1)
    fkl = (t * (t.log() - s.log())).sum(-1)
    ent = -(t * t.log()).sum(-1)
    mask = torch.rand(7, 3) > 0.2
    # tau halfway between two neighbouring entropies: no token within rounding of it
    values = ent[mask].sort().values
    mid = len(values) // 2
    tau = float(values[mid - 1] + values[mid]) / 2
    hi, lo = [], []
    for i in range(7):
        for j in range(3):
            if not mask[i, j]:
                continue
            pt, ps = t[i, j].tolist(), s[i, j].tolist()
            kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
            (hi if _entropy_py(pt) >= tau else lo).append(kl)
    out = high_entropy_fkl(fkl, ent, mask, tau)
    assert out["n_high"] == len(hi) and out["n_valid"] == len(hi) + len(lo)
    assert out["fkl_high"] == pytest.approx(sum(hi) / len(hi), rel=1e-10)
    assert out["fkl_low"] == pytest.approx(sum(lo) / len(lo), rel=1e-10)
    assert out["fkl_all"] == pytest.approx(sum(hi + lo) / len(hi + lo), rel=1e-10)
    with pytest.raises(ValueError):
        high_entropy_fkl(fkl, ent[:, :2], None)
    assert math.isnan(high_entropy_fkl(fkl, ent, mask, 1e9)["fkl_high"])


def test_summarize_samples():
    results = {
        "a": [[True, False, False, False], [False] * 4],
        "b": [[True] * 4, [True, False, True, False]],
    }
    out = summarize_samples(results, ks=(1, 4, 8))
    assert out["a/avg@4"] == pytest.approx(avg_at_k(results["a"]))
    assert out["b/pass@4"] == pytest.approx(pass_at_k(results["b"], 4))
    assert "a/pass@8" not in out  # k larger than the samples per prompt
    assert out["mean/pass@1"] == pytest.approx((out["a/pass@1"] + out["b/pass@1"]) / 2)


def test_plot_curves(tmp_path):
    curves = {
        "pass@8": {
            "OPD": [(0, 0.2, 0.01), (10, 0.3, 0.02)],
            "EOPD": [(0, 0.2, 0.0), (10, 0.35, 0.02)],
        },
        "high-entropy fraction": {"OPD": [(0, 0.1, 0.0)], "EOPD": [(0, 0.15, 0.0)]},
    }
    out = plot_curves(curves, tmp_path / "plots" / "curves.png")
    if not matplotlib_available():
        assert out is None
        return
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_entropy_stats_accumulate_like_one_batch():
    torch.manual_seed(2)
    hs, ht, f = torch.rand(3, 10, 4).unbind(0)
    hs, ht, f = hs * 2, ht * 2, f
    mask = torch.rand(10, 4) > 0.25
    whole = EntropyStats().update(hs, ht, mask, 0.8, f)
    parts = EntropyStats().update(hs[:4], ht[:4], mask[:4], 0.8, f[:4]) + EntropyStats().update(
        hs[4:], ht[4:], mask[4:], 0.8, f[4:]
    )
    for key, value in whole.summary().items():
        assert parts.summary()[key] == pytest.approx(value, rel=1e-12)
    s = EntropyStats.from_tensor(parts.to_tensor()).summary()
    assert s["student_high_frac"] == pytest.approx(high_entropy_fraction(hs, mask, 0.8))
    assert s["teacher_high_frac"] == pytest.approx(high_entropy_fraction(ht, mask, 0.8))
    ref = high_entropy_fkl(f, ht, mask, 0.8)
    assert s["fkl_high"] == pytest.approx(ref["fkl_high"]) and s["fkl_all"] == pytest.approx(
        ref["fkl_all"]
    )
    assert math.isnan(EntropyStats().summary()["student_high_frac"])
