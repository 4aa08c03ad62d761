"""Next-token sampling math: temperature, top-k, top-p, counter-based Gumbel noise (no collectives).

Two draws, both pure functions of the logits and of random numbers taken from an explicit
``torch.Generator`` (no global RNG state is touched, so rollouts after a resume repeat exactly):

- Plain sampling (top-k off, top-p 1): Gumbel-max, ``argmax_v (x_v / T + g_v)``, which samples
  exactly from softmax(x / T). The noise ``g_v`` of row r and vocabulary id v is a hash of
  (a 32-bit key drawn from the generator once per step, the row's index in the call's batch, v),
  so a vocabulary shard computes the noise of its own columns without communication and the draw
  does not depend on the TP size or on which rows are still in the decode batch. The uniform has
  32 bits (``(h + 0.5) / 2**32``), so the Gumbel values are capped at ~22.9; the total-variation
  error this introduces is below V * 2**-33 (1.8e-5 at V = 151,936). Where shards are whole
  blocks of ``PLAIN_BLOCK`` columns, ``blocked_draw`` draws the same distribution from one noise
  value per (row, block) and one uniform per row (see ``vocab_parallel``).
- Filtered sampling (top-k and/or top-p < 1): the kept set is a prefix of the vocabulary sorted by
  (scaled logit descending, id ascending) - the most likely token always kept, positions >= k
  dropped, positions whose mass before them reaches top_p dropped, mass from the UNtruncated
  softmax - and one uniform per row from the generator picks a token by inverse CDF over that
  sorted prefix (renormalised). ``filtered_draw`` also works on a partial sorted candidate list
  and says whether the candidates determined the kept set (see ``vocab_parallel``).

Log-probs and entropies are always those of the untruncated softmax at the log-prob temperature,
as the training forward computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_eaopd.losses._common import check_temperature

__all__ = [
    "MIN_TEMPERATURE",
    "PLAIN_BLOCK",
    "PositionRandoms",
    "SamplingParams",
    "block_view",
    "blocked_draw",
    "column_keys",
    "filter_logits",
    "filtered_draw",
    "gather_vocab_logits",
    "gumbel_noise",
    "plain_block",
    "row_bases",
    "row_keys",
    "sample_tokens",
    "step_randoms",
]

_M32 = 0xFFFFFFFF
MIN_TEMPERATURE = 1e-6
"""The smallest sampling temperature: the draws scale fp32 logits by 1/T, which overflows to inf
(and picks wrong tokens silently) for T below about max|logit| / 3.4e38."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn."""

    temperature: float = 1.0
    """Logits are divided by this before top-k / top-p and sampling (> 0)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p; 1.0 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    logprob_temperature: float | None = None
    """Temperature of the reported log-probs (the loss's temperature); None: ``temperature``.
    Log-probs are always of the untruncated softmax, as the training forward computes them."""

    def __post_init__(self):
        check_temperature(self.temperature)
        if self.temperature < MIN_TEMPERATURE:  # 1/T scales fp32 logits: overflow, wrong draws
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE} (the logits are scaled by 1/T in "
                f"fp32), got {self.temperature!r}; top_k=1 decodes greedily"
            )
        if self.logprob_temperature is not None:
            check_temperature(self.logprob_temperature, "logprob_temperature")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p truncates the sampling distribution."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def lp_temperature(self) -> float:
        return self.temperature if self.logprob_temperature is None else self.logprob_temperature


# --------------------------------------------------------------------------- random numbers


def step_randoms(generator: torch.Generator, rows: int, filtered: bool):
    """The random numbers of one decode step, drawn from ``generator`` (CPU).

    Returns (key, u): plain sampling draws one 32-bit int key (u is None); filtered sampling draws
    ``rows`` float64 uniforms in [0, 1) (key is None). Every rank drawing with the same generator
    state gets the same numbers.
    """
    if filtered:  # device="cpu": the CPU generator's draws, whatever the default device
        return None, torch.rand(rows, generator=generator, dtype=torch.float64, device="cpu")
    return int(torch.randint(0, 1 << 32, (1,), generator=generator, device="cpu")), None


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t.to(device, non_blocking=True)``: a host-to-GPU copy queued without the explicit wait
    for the device's queued kernels that a blocking ``.to`` makes. ``t`` must be a CPU tensor
    the host does not write afterwards (every caller passes a freshly made one). A no-op on the
    CPU."""
    return t.to(device, non_blocking=True)


def pack_draw(tokens, logprobs, entropies) -> torch.Tensor:
    """One decode step's draw as [3, n] float64 (exact for token ids and fp32 values): what the
    last pipeline stage broadcasts and what comes back to the host in one copy."""
    return torch.stack([tokens.double(), logprobs.double(), entropies.double()])


def unpack_draw(packed: torch.Tensor):
    """``pack_draw``'s inverse: (tokens int64, log-probs fp32, entropies fp32)."""
    return packed[0].long(), packed[1].float(), packed[2].float()


class PositionRandoms:
    """The random numbers of a whole ``generate`` call, keyed by sequence position.

    Position t's numbers are the (t - first)-th ``step_randoms`` draw from ``generator`` (drawn
    lazily, in position order, the first time any row reaches t), so a row's draw depends only on
    (its position, its index in the call's batch), not on which rows share its decode step: the
    same tokens unbatched, in chunks, or with rows refilled as others finish. Unbatched, the
    draws are those of one ``step_randoms`` call per decode step from position ``first`` on.

    Args:
        generator: CPU generator (the same state on every TP rank).
        rows: prompts in the call (filtered sampling draws that many uniforms per position).
        filtered: top-k / top-p sampling (uniforms) rather than plain (one 32-bit key).
        first: the first position ever sampled (the shortest prompt's length).
    """

    def __init__(self, generator: torch.Generator, rows: int, filtered: bool, first: int):
        self.generator, self.rows, self.filtered, self.first = generator, rows, filtered, first
        self.drawn = 0  # positions [first, first + drawn) have their numbers
        shape = (64, rows) if filtered else (64,)
        self._table = torch.empty(shape, dtype=torch.float64 if filtered else torch.int64,
                                  device="cpu")  # fmt: skip

    def _extend(self, last: int) -> None:
        need = last - self.first + 1
        if need > self._table.shape[0]:
            grown = self._table.new_empty((max(need, 2 * self._table.shape[0]),)
                                          + tuple(self._table.shape[1:]))  # fmt: skip
            grown[: self.drawn] = self._table[: self.drawn]
            self._table = grown
        while self.drawn < need:
            key, u = step_randoms(self.generator, self.rows, self.filtered)
            self._table[self.drawn] = u if self.filtered else key
            self.drawn += 1

    def at(self, positions: torch.Tensor, rows: torch.Tensor):
        """(keys [n] int64 or None, uniforms [n] float64 or None) of rows ``rows`` [n] (call
        batch ids) at positions ``positions`` [n] (CPU int64, each >= first). No communication."""
        lo, hi = int(positions.min()), int(positions.max())
        if lo < self.first:
            raise ValueError(f"position {lo} is before the first sampled position {self.first}")
        self._extend(hi)
        idx = positions - self.first
        if self.filtered:
            return None, self._table[idx, rows]
        return self._table[idx], None


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32).

    Products are reduced mod 2**32 after each multiply (int64 arithmetic wraps), so the result is
    the same on every device and in every shard."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def column_keys(start: int, count: int, device=None) -> torch.Tensor:
    """[count] int64 hashes of the global vocabulary ids [start, start + count)."""
    ids = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return _mix32((ids * 0x9E3779B1 + 0x7F4A7C15) & _M32)


def row_bases(rows: torch.Tensor) -> torch.Tensor:
    """[n] int64 hashes of the rows' batch ids [n]: the step-independent half of ``row_keys``
    (a sampler that knows how many rows a call has computes them once)."""
    return _mix32(rows.to(torch.int64) * 0x85EBCA77 + 0x165667B1 & _M32)


def row_keys(key: int | torch.Tensor, rows: torch.Tensor, bases: torch.Tensor | None = None):
    """[n] int64 per-row keys from the step's 32-bit key (an int, or [n] int64: one per row)
    and the rows' batch ids [n]; ``bases``: their ``row_bases`` if already known."""
    return _mix32((row_bases(rows) if bases is None else bases) ^ key)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float64 uniforms in (0, 1): (h + 0.5) / 2**32."""
    return (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def gumbel_noise(rkeys: torch.Tensor, ckeys: torch.Tensor) -> torch.Tensor:
    """[n, w] float64 standard Gumbel noise for rows ``rkeys`` [n] and columns ``ckeys`` [w]."""
    return -torch.log(-torch.log(_uniform(_mix32(rkeys[:, None] ^ ckeys[None, :]))))


PLAIN_BLOCK = 64
_INNER_SALT = 0x5BD1E995


def plain_block(width: int) -> int:
    """Block size of the plain draw for a vocabulary (shard) of ``width`` padded columns:
    ``PLAIN_BLOCK`` when it divides the width (every shard then starts on a block boundary),
    else 1 (one Gumbel per column)."""
    return PLAIN_BLOCK if width % PLAIN_BLOCK == 0 else 1


def blocked_draw(y: torch.Tensor, rkeys: torch.Tensor, first_block: int, entropy: bool = True,
                 bkeys: torch.Tensor | None = None):  # fmt: skip
    """Exact two-level draw from softmax over consecutive blocks of columns (no communication).

    The blocks are global (block i of ``y`` is block ``first_block + i`` of the vocabulary).
    Level 1: Gumbel-max over the blocks' log-masses, ``argmax_b (log sum_{v in b} e^{y_v} + g_b)``
    with counter-based noise per (row, block): block b wins with probability Z_b / Z. Level 2:
    one counter-based uniform per (row, winning block) picks the column inside it by inverse CDF:
    probability e^{y_v} / Z_b. So column v is drawn with probability e^{y_v} / Z, from
    ``w / B`` + 1 random numbers per row instead of w. The winner's score is comparable across
    shards (Gumbel-max over all blocks = over the shards' winners).

    Args:
        y: [n, nb, B] fp32 scaled logits (x / T); columns outside the vocabulary -inf.
        rkeys: [n] int64 row keys (``row_keys``).
        first_block: global index of block 0.
        entropy: also return the blocks' entropy numerators (one more pass over y; else None).
        bkeys: [nb] int64 ``column_keys(first_block, nb)`` if already known (a sampler keeps
            its shard's).
    Returns:
        best [n] float64 (the winning block's score), col [n] int64 (the column in ``y``
        flattened to [n, nb * B]), and the blocks' statistics [n, nb] fp32: max (0 for a block
        without mass), sum exp(y - max), sum exp(y - max) (y - max).
    """
    n, nb, block = y.shape
    top = y.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    d = (y - top).clamp_(min=-1e30)  # -inf columns: e = 0 and e * d = 0, not nan
    e = torch.exp(d)
    z = e.sum(-1)
    a = torch.linalg.vecdot(e, d) if entropy else None
    if bkeys is None:
        bkeys = column_keys(first_block, nb, y.device)
    # one hash pass: the blocks' noise [n, nb] and, in the last column, the rows' inner keys
    h = _mix32(torch.cat([rkeys[:, None] ^ bkeys, (rkeys ^ _INNER_SALT)[:, None]], 1))
    noise = -torch.log(-torch.log(_uniform(h[:, :nb])))  # = gumbel_noise(rkeys, bkeys)
    score = top[..., 0].double() + z.double().log() + noise
    best, blk = score.max(-1)
    cdf = e[torch.arange(n, device=y.device), blk].double().cumsum(-1)  # [n, B]
    u = _uniform(_mix32(h[:, nb] ^ bkeys[blk]))  # < 1: the target < the block's mass
    inner = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return best, blk * block + inner.clamp_(max=block - 1), top[..., 0], z, a


def block_view(x: torch.Tensor, block: int) -> torch.Tensor:
    """[n, w] -> [n, ceil(w / block), block], the last block padded with -inf."""
    n, w = x.shape
    nb = -(-w // block)
    if nb * block != w:
        x = torch.nn.functional.pad(x, (0, nb * block - w), value=float("-inf"))
    return x.reshape(n, nb, block)


# --------------------------------------------------------------------------- filtered draws


def filtered_draw(
    sorted_logits: torch.Tensor,
    known: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    top_k: int,
    top_p: float,
    u: torch.Tensor,
    complete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw from the top-k / top-p prefix of a sorted candidate list.

    Args:
        sorted_logits: [n, m] raw logits sorted by (logit desc, id asc), float64.
        known: [n, m] bool, True on the leading entries that are certainly the top of the full
            vocabulary in that order (a prefix of each row).
        lse: [n] float64 log-sum-exp of logits * inv_temp over the FULL vocabulary.
        top_k, top_p: the filter; u: [n] float64 uniforms in [0, 1).
        complete: the candidates are the whole vocabulary (always sufficient).
    Returns:
        (position [n] int64 into the sorted list, sufficient [n] bool: the known prefix
        determined the kept set, so the draw equals the full-vocabulary draw).
    No communication.
    """
    p = torch.where(known, torch.exp(sorted_logits * inv_temp - lse[:, None]), 0.0)
    pos = torch.arange(p.shape[1], device=p.device)
    mass_before = torch.cumsum(p, dim=-1) - p
    keep = known.clone()
    sufficient = torch.full_like(known[:, 0], complete)
    if top_k > 0:
        keep &= pos < top_k
        sufficient |= known.sum(-1) >= top_k
    if top_p < 1.0:
        keep &= mass_before < top_p
        sufficient |= p.sum(-1) >= top_p
    keep[:, 0] = known[:, 0]
    cdf = torch.cumsum(torch.where(keep, p, 0.0), dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=p.shape[1] - 1)
    sufficient &= known[:, 0]
    return choice, sufficient


def _sort_desc_stable(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort [n, m] descending, ties keeping the lower column first: (sorted, order)."""
    return torch.sort(values, dim=-1, descending=True, stable=True)


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf. ``scaled``: [b, V], already / T.

    The most likely token is always kept. Ties at the top-k boundary keep the lower ids (a stable
    sort), so the result is deterministic. The same kept set as ``filtered_draw`` (float64 mass).
    """
    if top_k <= 0 and top_p >= 1.0:
        return scaled
    sorted_logits, order = _sort_desc_stable(scaled)
    s64 = sorted_logits.double()
    lse = torch.logsumexp(s64, dim=-1)
    p = torch.exp(s64 - lse[:, None])
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k > 0:
        drop[:, top_k:] = True
    if top_p < 1.0:
        drop |= (torch.cumsum(p, dim=-1) - p) >= top_p
    drop[:, 0] = False
    out = scaled.clone()
    out.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return out


# --------------------------------------------------------------------------- full vocabulary


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """Full-vocabulary fp32 logits from a vocab-parallel shard, padded columns removed.

    Args:
        logits: [..., V_pad / tp] this rank's shard (megatron's vocab-parallel output layer).
        vocab_size: real vocabulary size; columns >= vocab_size (megatron's padding) are dropped.
        tp_group: tensor-parallel group; None: megatron's current one.
    Returns:
        [..., vocab_size] fp32, identical on every rank of the group.
    Collectives: 1 all-gather over the TP group (none at TP=1).
    """
    import torch.distributed as dist

    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group=tp_group) if dist.is_initialized() else 1
    local = logits.float().contiguous()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=tp_group)
        local = torch.cat(parts, dim=-1)
    if local.shape[-1] < vocab_size:
        raise ValueError(f"logits have {local.shape[-1]} columns, fewer than vocab {vocab_size}")
    return local[..., :vocab_size]


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, block: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of full-vocabulary logits (the single-rank reference).

    Args:
        logits: [b, V] fp32 full-vocabulary logits (padding removed).
        params: temperature / top-k / top-p.
        generator: one step's random numbers are drawn (``step_randoms``); rows are 0..b-1.
        block: plain sampling: 1, one Gumbel per column; B > 1, ``blocked_draw`` over blocks of
            B columns (``VocabParallelSampler`` uses ``plain_block(shard width)``).
    Returns:
        (tokens [b] int64, logprobs [b] fp32 = log softmax(logits / T_lp)[token] of the untruncated
        distribution, entropy [b] fp32 of that same distribution, in nats).
    No communication; the same draw as ``VocabParallelSampler`` at any TP size whose
    ``plain_block`` is ``block``.
    """
    b = logits.shape[0]
    key, u = step_randoms(generator, b, params.filtered)
    u = None if u is None else u.to(logits.device)
    x = logits.double()
    if params.filtered:
        sorted_logits, order = _sort_desc_stable(x)
        lse_t = torch.logsumexp(x / params.temperature, dim=-1)
        known = torch.ones_like(sorted_logits, dtype=torch.bool)
        choice, _ = filtered_draw(sorted_logits, known, lse_t, 1.0 / params.temperature,
                                  params.top_k, params.top_p, u, complete=True)  # fmt: skip
        tokens = order.gather(-1, choice[:, None]).squeeze(-1)
    elif block > 1:
        rkeys = row_keys(key, torch.arange(b, device=logits.device))
        y = block_view(logits.float() * (1.0 / params.temperature), block)
        tokens = blocked_draw(y, rkeys, 0, entropy=False)[1]
    else:
        rows = torch.arange(b, device=logits.device)
        noise = gumbel_noise(row_keys(key, rows), column_keys(0, x.shape[-1], logits.device))
        tokens = (x * (1.0 / params.temperature) + noise).argmax(-1)
    logp = torch.log_softmax(x / params.lp_temperature, dim=-1)
    token_logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)
    return tokens, token_logprobs.float(), entropy.float()
