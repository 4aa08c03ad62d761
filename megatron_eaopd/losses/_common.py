"""Input checks and the cross-rank merge of packed per-token statistics (no collectives here)."""

from __future__ import annotations

import math

import torch

from megatron_eaopd.parallel.groups import resolve_tp_group, tp_rank_and_size
from megatron_eaopd.parallel.vocab import VocabShard, vocab_shard


class NonFiniteLogitsError(ValueError):
    """Logits holding NaN or +inf reached a vocab-parallel statistic (raised on every rank)."""


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def prepare_logits(
    logits: torch.Tensor, name: str, tp_group, vocab_size, temperature: float
) -> tuple[torch.Tensor, tuple, VocabShard, object, float]:
    """Validate one [..., w] logits shard and flatten it to [n, w].

    Returns (logits2d, leading_shape, shard, tp_group, 1 / temperature).
    Raises ValueError naming the problem: wrong dtype/rank, non-positive temperature, a vocab_size
    that does not fit the shards.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"{name} must have shape [..., V/tp] with at least 2 dims, got {list(logits.shape)}"
        )
    check_temperature(temperature)
    group = resolve_tp_group(tp_group)
    rank, size = tp_rank_and_size(group)
    width = logits.shape[-1]
    shard = vocab_shard(width, rank, size, vocab_size)
    lead = tuple(logits.shape[:-1])
    return logits.reshape(-1, width), lead, shard, group, 1.0 / float(temperature)


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} {list(a.shape)} and {name_b} {list(b.shape)} must have the same shape "
            "[s, b, V/tp] (same tokens, same vocabulary shard)"
        )


def check_token_ids(ids: torch.Tensor, lead: tuple, vocab_size: int, name: str) -> torch.Tensor:
    """Validate integer ids of shape lead or lead + (j,); return them as int64 [n, j]."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape[: len(lead)]) != lead or ids.dim() not in (len(lead), len(lead) + 1):
        raise ValueError(
            f"{name} has shape {list(ids.shape)}; expected {list(lead)} or {list(lead)} + [j] to "
            "match the logits' leading dims"
        )
    j = ids.shape[-1] if ids.dim() == len(lead) + 1 else 1  # explicit: lead may hold a 0
    ids2d = ids.reshape(math.prod(lead), j).long()
    if ids2d.numel() and bool(((ids2d < 0) | (ids2d >= vocab_size)).any()):
        bad = ids2d[(ids2d < 0) | (ids2d >= vocab_size)][0].item()
        raise ValueError(
            f"{name} contains id {bad} outside [0, vocab_size={vocab_size}); mask invalid "
            "positions with a loss mask and give them any valid id (e.g. 0)"
        )
    return ids2d


def stats_buffer(n: int, cols: int, width: int, dtype, device) -> torch.Tensor:
    """[n, cols + 1] buffer for packed per-token statistics; the last column holds this rank's
    shard width so the merge can check that all ranks agree (no extra copy before the gather)."""
    buf = torch.empty(n, cols + 1, dtype=dtype, device=device)
    buf[:, -1] = float(width)
    return buf


def check_gathered(gathered: torch.Tensor, max_cols: list[int], what: str) -> None:
    """Checks made identically on every rank after the gather, so all ranks raise together.

    gathered: [tp, n, c] with the shard width in the last column; max_cols: columns holding local
    maxima (NaN / +inf there means the logits held NaN / +inf).
    """
    if gathered.shape[1] == 0:
        return
    widths = gathered[:, 0, -1]
    if bool((widths != widths[0]).any()):
        raise ValueError(
            f"{what}: TP ranks hold logits shards of different widths {widths.long().tolist()}; "
            "every rank must hold V_pad / tp columns"
        )
    maxima = gathered[..., max_cols]
    if bool((torch.isnan(maxima) | (maxima == math.inf)).any()):
        raise NonFiniteLogitsError(f"{what}: logits contain NaN or +inf; check the model outputs")
    if bool((maxima.amax(0) == -math.inf).any()):
        raise ValueError(
            f"{what}: every vocabulary column is -inf (masked) for some token; at least one "
            "column per token must be finite"
        )


def merge_single(m: torch.Tensor, z: torch.Tensor, a: torch.Tensor):
    """Merge per-rank (max, sum exp, sum exp * shifted x) into global (lse, entropy).

    Args: [tp, n] float64 each. Returns lse [n] and entropy [n] (float64), using
    Z = sum_r exp(m_r - M) Z_r and A = sum_r exp(m_r - M) (A_r + (m_r - M) Z_r).
    """
    big_m = m.amax(0)
    live = z > 0
    dm = torch.where(live, m - big_m, 0.0)
    w = torch.where(live, torch.exp(dm), 0.0)
    z_g = (w * z).sum(0)
    a_g = (w * (a + dm * z)).sum(0)
    log_z = torch.log(z_g)
    return big_m + log_z, log_z - a_g / z_g


def check_temperature(temperature, name: str = "temperature") -> None:
    """ValueError (naming it ``name``) unless ``temperature`` is a finite number > 0."""
    ok = (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
          and math.isfinite(temperature))  # fmt: skip
    if not (ok and temperature > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
