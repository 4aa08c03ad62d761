"""Communication-free per-shard math for the vocab-parallel losses (the `_math` layer).

Every function here works on one TP rank's shard of logits, `[n, w]` with `w = V_pad / tp`, a row
chunk at a time, and makes no collective. Inputs may be fp32, bf16 or fp16 (arithmetic in fp32)
or fp64 (arithmetic in fp64, for gradcheck). Columns at or beyond `valid` are Megatron vocabulary
padding and are treated as -inf, as are -inf entries (masked columns); products with a zero
probability are taken as zero so that masked columns never produce NaN.

The functions are written as plain torch ops on purpose: `kernel()` runs them through
`torch.compile` (Inductor generates one fused C++/OpenMP loop on CPU, one Triton kernel on GPU), so
each row chunk is read once per pass and no [n, w] intermediate is materialised. Set
`EAOPD_COMPILE=0` to run them eagerly (used by most tests: no compile latency; same math).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

_NEG_INF = float("-inf")

# --------------------------------------------------------------------------- compile switch

_compiled: dict = {}
_compile_broken = False


def compile_enabled() -> bool:
    """Whether the kernels run through torch.compile (env EAOPD_COMPILE, default on)."""
    return os.environ.get("EAOPD_COMPILE", "1") not in ("0", "false", "False", "") and (
        not _compile_broken
    )


def _compile_min_elems() -> int:
    """Chunks smaller than this (env EAOPD_COMPILE_MIN_ELEMS, default 2**20 values) run eagerly:
    for tiny models the compile latency (seconds) outweighs any gain."""
    return int(os.environ.get("EAOPD_COMPILE_MIN_ELEMS", str(1 << 20)))


def kernel(fn):
    """Run `fn` compiled when `compile_enabled()` and its first argument has at least
    `_compile_min_elems()` values, else eagerly; fall back to eager if the compiler is
    unavailable (warns once). The math is identical either way."""

    @functools.wraps(fn)
    def wrapper(*args):
        global _compile_broken
        if not compile_enabled() or args[0].numel() < _compile_min_elems():
            return fn(*args)
        compiled = _compiled.get(fn)
        if compiled is None:
            compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - compiler missing or failing: use eager
            _compile_broken = True
            warnings.warn(
                f"torch.compile failed for {fn.__name__} ({type(exc).__name__}: {exc}); running "
                "the vocab-parallel loss kernels eagerly. Set EAOPD_COMPILE=0 to silence this.",
                stacklevel=2,
            )
            return fn(*args)

    wrapper.eager = fn
    return wrapper


def row_chunk(width: int, rows: int | None = None, chunk_elems: int | None = None) -> int:
    """Rows (tokens) per chunk of an [n, width] shard.

    `rows` (the config's `loss.chunk_size`) wins when given. Otherwise about `chunk_elems` values
    per [rows, width] block (env EAOPD_CHUNK_ELEMS, a benchmark override): eager kernels
    materialise a few fp32 temporaries of that size, so the default is 2**24 (64 MiB each);
    compiled kernels materialise none, so the default is 2**28 (fewer, larger launches; only the
    [rows, c] per-token outputs scale with it)."""
    if rows is not None:
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"chunk_size={rows!r} must be an int >= 1 (tokens per row chunk)")
        return rows
    if chunk_elems is None:
        default = 1 << 28 if compile_enabled() else 1 << 24
        chunk_elems = int(os.environ.get("EAOPD_CHUNK_ELEMS", str(default)))
    return max(1, chunk_elems // max(1, width))


# --------------------------------------------------------------------------- helpers


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (gradcheck), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, valid: int, inv_temp: float) -> torch.Tensor:
    """logits / temperature in the accumulation dtype (fp64 for fp64 input, else fp32), with
    padding columns (>= valid) set to -inf: [n, w]."""
    x = logits.to(acc_dtype(logits.dtype)) * inv_temp
    if valid < logits.shape[-1]:
        col = torch.arange(logits.shape[-1], device=logits.device)
        x = torch.where(col < valid, x, _NEG_INF)
    return x


def _safe_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max [n] (NaN and +inf propagate, reported later) and the finite shift used for exp."""
    m = x.amax(dim=-1)
    return m, torch.where(torch.isfinite(m), m, 0.0)


def _xlogy0(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p * y with 0 where p == 0 (so masked columns with y = +-inf give 0, not NaN)."""
    return torch.where(p > 0, p * y, 0.0)


# --------------------------------------------------------------------------- one distribution


@kernel
def single_stats(logits: torch.Tensor, valid: int, inv_temp: float) -> torch.Tensor:
    """Local softmax statistics of one distribution.

    Args:
        logits: [n, w] local shard (any float dtype).
    Returns:
        [n, 3] fp32: local max m_r, Z_r = sum exp(x - m_r), A_r = sum exp(x - m_r) * (x - m_r),
        where x = logits / T over the valid columns. Merged across ranks by `merge_single`.
    """
    x = _scaled(logits, valid, inv_temp)
    m, shift = _safe_max(x)
    y = x - shift[:, None]
    e = torch.exp(y)
    return torch.stack([m, e.sum(-1), _xlogy0(e, y).sum(-1)], dim=-1)


@kernel
def single_backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_entropy: torch.Tensor,
    g_total: torch.Tensor,
    valid: int,
    inv_temp: float,
    out: torch.Tensor,
) -> None:
    """Dense part of d/d logits of  g_H * H + sum_j g_j * log p(id_j), written into `out`.

    With p = softmax(x), x = logits / T:  dH/dx = -p (log p + H),  d log p(v)/dx = onehot(v) - p.
    This writes  out = (1/T) * p * (-g_H (log p + H) - G),  G = sum_j g_j  (the one-hot part is
    scattered by the caller onto the few owned ids).

    Args:
        logits: [n, w]; lse, entropy, g_entropy, g_total: [n] fp32 per-token values
            (lse = global log-normaliser of x); out: [n, w] in the logits' dtype (written in place).
    """
    x = _scaled(logits, valid, inv_temp)
    logp = x - lse[:, None]
    p = torch.exp(logp)
    coef = _xlogy0(p, -g_entropy[:, None] * (logp + entropy[:, None])) - p * g_total[:, None]
    out.copy_(coef * inv_temp)


# --------------------------------------------------------------------------- student x teacher


@kernel
def pair_stats(
    student: torch.Tensor, teacher: torch.Tensor, valid: int, inv_temp: float
) -> torch.Tensor:
    """Local statistics of student (s) and teacher (t) softmaxes in one pass over both shards.

    With xs = s / T - ms_r, xt = t / T - mt_r (shifted by the local maxima), es = exp(xs),
    et = exp(xt) and d = xt - xs, returns [n, 8] fp32:
        [ms_r, mt_r, Zs_r = sum es, Zt_r = sum et, As_r = sum es*xs, At_r = sum et*xt,
         F_r = sum et*d, R_r = sum es*d]
    Merged across ranks by `merge_pair` into entropies and both KL directions.
    """
    xs = _scaled(student, valid, inv_temp)
    xt = _scaled(teacher, valid, inv_temp)
    ms, shift_s = _safe_max(xs)
    mt, shift_t = _safe_max(xt)
    ys = xs - shift_s[:, None]
    yt = xt - shift_t[:, None]
    es = torch.exp(ys)
    et = torch.exp(yt)
    d = yt - ys
    return torch.stack(
        [
            ms,
            mt,
            es.sum(-1),
            et.sum(-1),
            _xlogy0(es, ys).sum(-1),
            _xlogy0(et, yt).sum(-1),
            _xlogy0(et, d).sum(-1),
            _xlogy0(es, d).sum(-1),
        ],
        dim=-1,
    )


@kernel
def pair_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    g_rkl: torch.Tensor,
    g_fkl: torch.Tensor,
    g_hs: torch.Tensor,
    rkl: torch.Tensor,
    hs: torch.Tensor,
    valid: int,
    inv_temp: float,
    out: torch.Tensor,
) -> None:
    """d/d student logits of  g_R * KL(ps||pt) + g_F * KL(pt||ps) + g_H * H(ps),  into `out`.

    With x = s / T, ps = softmax(x), pt = softmax(t / T):
        dKL(ps||pt)/dx = ps (log ps - log pt - KL(ps||pt))
        dKL(pt||ps)/dx = ps - pt
        dH(ps)/dx      = -ps (log ps + H(ps))
    and d/ds = (1/T) d/dx. All per-token inputs are [n] fp32; `out` is [n, w] (written in place).
    No communication: lse_s, lse_t (global log-normalisers), rkl and hs come from the forward.
    """
    lps = _scaled(student, valid, inv_temp) - lse_s[:, None]
    lpt = _scaled(teacher, valid, inv_temp) - lse_t[:, None]
    ps = torch.exp(lps)
    pt = torch.exp(lpt)
    gr = g_rkl[:, None]
    gh = g_hs[:, None]
    gf = g_fkl[:, None]
    rkl_term = torch.where(gr != 0, gr * (lps - lpt - rkl[:, None]), 0.0)
    inner = rkl_term - gh * (lps + hs[:, None]) + gf
    grad = _xlogy0(ps, inner) - gf * pt
    out.copy_(grad * inv_temp)


# --------------------------------------------------------------------------- generalised JSD


@kernel
def jsd_partials(
    student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
    log_beta: float, log_1m_beta: float, valid: int, inv_temp: float,
) -> torch.Tensor:  # fmt: skip
    """Local partial sums of KL(pt || M) and KL(ps || M), M = beta pt + (1 - beta) ps: [n, 2].

    Needs the global log-normalisers (so it runs after the statistics gather); the caller sums
    the partials over TP ranks.
    """
    lps = _scaled(student, valid, inv_temp) - lse_s[:, None]
    lpt = _scaled(teacher, valid, inv_temp) - lse_t[:, None]
    log_m = torch.logaddexp(lpt + log_beta, lps + log_1m_beta)
    kl_t = _xlogy0(torch.exp(lpt), lpt - log_m).sum(-1)
    kl_s = _xlogy0(torch.exp(lps), lps - log_m).sum(-1)
    return torch.stack([kl_t, kl_s], dim=-1)


@kernel
def jsd_backward(
    student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
    kl_s: torch.Tensor, coef: torch.Tensor, log_beta: float, log_1m_beta: float, valid: int,
    inv_temp: float, out: torch.Tensor,
) -> None:  # fmt: skip
    """d JSD_beta / d student logits = coef * ps (log ps - log M - KL(ps || M)) / T into `out`.

    (d JSD / d ps = (1 - beta)(log ps - log M); the caller folds (1 - beta) * upstream into coef.)
    """
    lps = _scaled(student, valid, inv_temp) - lse_s[:, None]
    lpt = _scaled(teacher, valid, inv_temp) - lse_t[:, None]
    log_m = torch.logaddexp(lpt + log_beta, lps + log_1m_beta)
    ps = torch.exp(lps)
    grad = _xlogy0(ps, coef[:, None] * (lps - log_m - kl_s[:, None]))
    out.copy_(grad * inv_temp)
