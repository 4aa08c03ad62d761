"""Vocab-parallel next-token sampling: the vocabulary is never gathered on the common path.

Each TP rank holds columns [r * V_pad / tp, (r + 1) * V_pad / tp) of the last position's logits
(megatron's vocab-parallel output layer, ``runtime_gather_output=False``). Per decode step:

- Plain sampling (top-k off, top-p 1, the training rollouts): every shard draws its own
  candidate and a score comparable across shards, and keeps (score, global id) and the
  candidate's logit; the same packet carries the shard's softmax statistics at the log-prob
  temperature (max, sum-exp, entropy numerator, or the equivalent (lse, 1, -entropy)).
  ONE all-gather of [n, 6] float64 per step; every rank then merges identically in float64: the
  token is the best score over shards (ties: the lowest id), its log-prob is
  logit / T_lp - lse, the entropy comes from ``merge_single``. (At TP 1 with T_lp == T and
  blocks, the draw and its statistics are returned without the packet and the one-shard merge,
  which would give the same numbers.) The rows' hashes are computed once per ``generate`` call
  when the sampler is told the call's row count. The shard's draw:
  - shard width a multiple of ``sampling.PLAIN_BLOCK`` (64; megatron pads the vocabulary to
    ``make_vocab_size_divisible_by`` x tp, 128 x tp by default): ``sampling.blocked_draw``, a
    Gumbel-max over global blocks of 64 columns (score: the block's log-mass + its noise) and an
    inverse-CDF draw inside the winning block - 1/64 of the random numbers and no float64 pass
    over the logits (measured 0.5 ms against 1.0 ms compiled per step at [32, 4096] on one CPU
    thread, ``benchmarks/bench_decode_ab.py --sections sampler``);
  - otherwise one counter-based Gumbel per global column (``sampling.gumbel_noise``) added to
    logits / T.
  Both are exact draws from softmax(logits / T). The tokens are the same at every TP size whose
  shard width is a multiple of 64 (the blocks are global), and the same at every TP size whose
  width is not; a model whose padded vocabulary gives a multiple of 64 at one TP size and not at
  another draws other (equally distributed) tokens at the two.
- Filtered sampling (top-k and/or top-p < 1, the evaluation settings): every shard sends its
  ``c + 1`` largest logits and their ids (c = top_k, or an adaptive candidate count for top-p
  alone) with the statistics at T and at T_lp: ONE all-gather of [n, 6 + 2 (c + 1)]. The
  candidates larger than every shard's (c + 1)-th value are exactly the top of the full
  vocabulary; when they settle the kept set (k of them, or mass >= top_p) the draw is the exact
  full-vocabulary draw (``sampling.filtered_draw``). Otherwise - a flat distribution under top-p,
  or a tie at a shard's boundary - the step falls back to gathering the full logits (a second
  all-gather of [n, V_pad / tp]) and draws from them with the same uniforms; under top-p alone c
  is then doubled for the following steps. The distribution is never approximated.

Every rank of the TP group must hold the same generator state; all ranks return the same tokens.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import merge_single
from megatron_eaopd.parallel.groups import all_gather_rows, tp_rank_and_size
from megatron_eaopd.parallel.vocab import vocab_shard
from megatron_eaopd.rollout.sampling import (
    SamplingParams,
    block_view,
    blocked_draw,
    column_keys,
    filtered_draw,
    gumbel_noise,
    plain_block,
    row_bases,
    row_keys,
    step_randoms,
    to_device,
)

__all__ = ["VocabParallelSampler"]

_NEG_INF = float("-inf")
_compiled = {}


def _plain_local_eager(x, rkeys, ckeys, inv_temp: float, inv_lp: float):
    """Shard-local part of a plain draw on the valid columns x [n, w] (w >= 1).

    Returns [n, 6] float64: max, sum-exp and entropy numerator of x / T_lp (as
    ``_kernels.single_stats``), the best x / T + Gumbel noise, its local column, and the logit
    of that column / T_lp."""
    y = x.float() * inv_lp
    m = y.amax(-1)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    d = y - shift[:, None]
    e = torch.exp(d)
    a = torch.where(e > 0, e * d, 0.0).sum(-1)
    best, arg = (x.double() * inv_temp + gumbel_noise(rkeys, ckeys)).max(-1)
    cand = x.gather(1, arg[:, None]).squeeze(1).double() * inv_lp
    return torch.stack([m.double(), e.sum(-1).double(), a.double(), best, arg.double(), cand], -1)


def _plain_local(x, rkeys, ckeys, inv_temp: float, inv_lp: float):
    """``_plain_local_eager`` fused by torch.compile when the losses' kernels are compiled
    (``EAOPD_COMPILE``; a few fused loops instead of ~25 passes over [n, w]; compiled once per
    process, dynamic shapes), else eager. The integer hash is exact; the compiled log rounds
    differently in the last bits, so only a float64 near-tie (~1e-16 relative) could pick
    another token than the eager kernel (or than another TP size's shard widths)."""
    if not K.compile_enabled():
        return _plain_local_eager(x, rkeys, ckeys, inv_temp, inv_lp)
    fn = _compiled.get("plain")
    if fn is None:
        fn = _compiled["plain"] = torch.compile(_plain_local_eager, dynamic=True)
    try:
        return fn(x, rkeys, ckeys, inv_temp, inv_lp)
    except Exception as exc:  # noqa: BLE001 - compiler missing or failing: stay eager
        _compiled["plain"] = _plain_local_eager
        warnings.warn(f"torch.compile of the Gumbel sampler failed ({exc}); running eagerly",
                      stacklevel=2)  # fmt: skip
        return _plain_local_eager(x, rkeys, ckeys, inv_temp, inv_lp)


class VocabParallelSampler:
    """Draws one token per row from vocab-parallel logit shards (see the module docstring).

    Args:
        params: the sampling settings.
        vocab_size: the real vocabulary; padded columns are never sampled.
        width: this rank's shard width V_pad / tp.
        tp_group: the tensor-parallel group (None: a single rank, no communication).
        device: where the logits live.
        candidates: first candidate count per shard for top-p without top-k (default 64).
        rows: the call's number of rows, when known: every ``rows`` passed to ``draw`` is then
            below it, and the rows' hashes are computed once here instead of every step.
    Attributes:
        counters: steps, fallbacks (full gathers), tokens (rows sampled), elements (elements of
            every collective this sampler made, as seen by this rank's output buffers).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, width: int, tp_group=None,
                 device=None, candidates: int = 64, rows: int | None = None):  # fmt: skip
        self.params = params
        self.group = tp_group
        self.rank, self.tp = tp_rank_and_size(tp_group)
        self.shard = vocab_shard(width, self.rank, self.tp, vocab_size)
        self.vocab_size = vocab_size
        self.inv_t = 1.0 / params.temperature
        self.inv_lp = 1.0 / params.lp_temperature
        self.filtered = params.filtered
        self.c = min(params.top_k or candidates, max(1, self.shard.width))
        self.block = plain_block(self.shard.width)
        self.ckeys = self.bases = None
        self._bkeys = {}  # (first block, blocks) -> their column_keys, for the blocked draw
        if not self.filtered and self.block == 1:
            self.ckeys = column_keys(self.shard.start, self.shard.valid, device)
        if not self.filtered and rows is not None:
            self.bases = row_bases(torch.arange(rows, device=device))
        self.counters = {"steps": 0, "fallbacks": 0, "tokens": 0, "elements": 0}

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, generator: torch.Generator,
               batch: int):  # fmt: skip
        """One step.

        Args:
            logits: [n, V_pad / tp] this rank's shard of the logits predicting the next token.
            rows: [n] int64 ids of these rows in the whole batch (noise and uniforms follow the
                row, so dropping finished rows does not change the other rows' draws).
            generator: CPU generator, the same state on every TP rank.
            batch: rows in the whole batch (filtered sampling draws that many uniforms).
        Returns:
            (tokens [n] int64, logprobs [n] fp32, entropies [n] fp32), identical on all ranks.
        Collectives: 1 all-gather of [n, 6] float64 (plain) or [n, 6 + 2 (c + 1)] float64
        (filtered); on a filtered fallback step also 1 all-gather of [n, V_pad / tp] fp32.
        """
        key, u = step_randoms(generator, batch, self.filtered)
        return self.draw(logits, rows, key, None if u is None else u[rows.cpu()])

    def draw(self, logits: torch.Tensor, rows: torch.Tensor, keys, u):
        """One step with given random numbers (``sample`` draws them; ``PositionRandoms`` gives
        them per row when the rows of a step sit at different positions).

        Args:
            logits: [n, V_pad / tp] this rank's shard.
            rows: [n] int64 ids of these rows in the whole batch.
            keys: plain sampling: the step's 32-bit key (int) or one per row ([n] int64);
                filtered: None.
            u: filtered sampling: [n] float64 uniforms of these rows; plain: None.
        Returns and collectives: as ``sample``.
        """
        if logits.shape[-1] != self.shard.width:
            raise ValueError(f"logits shard has {logits.shape[-1]} columns, expected "
                             f"{self.shard.width}")  # fmt: skip
        self.counters["steps"] += 1
        self.counters["tokens"] += logits.shape[0]
        if self.filtered:
            return self._filtered(logits, to_device(u, logits.device))
        if isinstance(keys, torch.Tensor):
            keys = to_device(keys, logits.device)
        return self._plain(logits, keys, rows)

    # ------------------------------------------------------------------ plain (Gumbel-max)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        out = all_gather_rows(local, self.group)
        if self.tp > 1:
            self.counters["elements"] += out.numel()
        return out

    def _plain(self, logits, key, rows):
        n, valid = logits.shape[0], self.shard.valid
        if valid > 0:
            rows = rows.to(logits.device)
            if self.bases is not None and self.bases.device != logits.device:
                self.bases = self.bases.to(logits.device)  # built for another device
            rkeys = row_keys(key, rows, None if self.bases is None else self.bases[rows])
            if self.tp == 1 and self.block > 1 and self.inv_lp == self.inv_t:
                return self._blocked_single(logits[:, :valid], rkeys)
            if self.block > 1:
                packet = self._blocked_local(logits[:, :valid], rkeys)
            else:
                packet = _plain_local(logits[:, :valid], rkeys, self.ckeys, self.inv_t,
                                      self.inv_lp)  # fmt: skip
            packet[:, 4] += self.shard.start
        else:  # a shard of padding only: no mass, never the best
            packet = torch.zeros(n, 6, dtype=torch.float64, device=logits.device)
            packet[:, 0] = packet[:, 3] = _NEG_INF
        g = self._gather(packet)  # [tp, n, 6]
        lse, entropy = merge_single(g[..., 0], g[..., 1], g[..., 2])
        win = g[..., 3].argmax(0, keepdim=True)  # the first maximum: the lowest global id
        tokens = g[..., 4].gather(0, win).squeeze(0).long()
        logprobs = g[..., 5].gather(0, win).squeeze(0) - lse
        return tokens, logprobs.float(), entropy.float()

    def _blocks(self, x, rkeys, stats: bool):
        """``sampling.blocked_draw`` over the valid columns x [n, valid] of the shard (blocks of
        ``self.block``; the shard starts on a block boundary), at temperature T."""
        y = x.float() if self.inv_t == 1.0 else x.float() * self.inv_t
        y = block_view(y, self.block)
        first = self.shard.start // self.block
        bkeys = self._bkeys.get((first, y.shape[1]))
        if bkeys is None:
            bkeys = self._bkeys[(first, y.shape[1])] = column_keys(first, y.shape[1], x.device)
        return blocked_draw(y, rkeys, first, stats, bkeys)

    @staticmethod
    def _block_stats(top, z, a):
        """(lse [n], entropy [n]) float64 of the whole shard from the blocks' statistics
        [n, nb] (blocks without mass must not set the merge's shift)."""
        top = torch.where(z > 0, top, float("-inf"))
        return merge_single(top.t().double(), z.t().double(), a.t().double())

    def _blocked_single(self, x, rkeys):
        """TP 1 at T_lp == T: the draw and its statistics without a packet or a merge over
        shards, the same numbers bit for bit: a one-shard merge adds log 1 = 0 to a finite lse
        and makes any other NaN (a row with a +inf logit: NaN log-prob, as at TP > 1)."""
        _, col, top, z, a = self._blocks(x, rkeys, True)
        lse, entropy = self._block_stats(top, z, a)
        lse = torch.where(torch.isfinite(lse), lse, float("nan"))
        col = col.clamp_(max=x.shape[1] - 1)
        logprobs = x.gather(1, col[:, None]).squeeze(1).double() * self.inv_lp - lse
        return col, logprobs.float(), entropy.float()

    def _blocked_local(self, x, rkeys):
        """The shard's packet [n, 6] float64 from ``sampling.blocked_draw`` over its valid
        columns x [n, valid] (blocks of ``self.block``; the shard starts on a block boundary).
        At T_lp == T the statistics come from the blocks' (lse, entropy) as the triple
        (lse, 1, -entropy), which ``merge_single`` merges as it merges (max, sum-exp, A)."""
        n = x.shape[0]
        same_t = self.inv_lp == self.inv_t  # the statistics come from the blocks
        best, col, top, z, a = self._blocks(x, rkeys, same_t)
        packet = torch.empty(n, 6, dtype=torch.float64, device=x.device)
        if same_t:
            lse, entropy = self._block_stats(top, z, a)
            live = torch.isfinite(lse)
            packet[:, 0] = lse
            packet[:, 1] = live.double()
            packet[:, 2] = torch.where(live, -entropy, 0.0)
        else:
            packet[:, :3] = K.single_stats(x, x.shape[1], self.inv_lp)
        col = col.clamp_(max=x.shape[1] - 1)  # a shard whose columns are all -inf: never wins
        packet[:, 3] = best
        packet[:, 4] = col
        packet[:, 5] = x.gather(1, col[:, None]).squeeze(1).double() * self.inv_lp
        return packet

    # ------------------------------------------------------------------ top-k / top-p

    def _filtered(self, logits, u):
        n, valid, c = logits.shape[0], self.shard.valid, self.c
        cols = 6 + 2 * (c + 1)
        packet = torch.empty(n, cols, dtype=torch.float64, device=logits.device)
        # the kept set's masses come from the statistics at T: float64, so that a top_p near a
        # token's mass keeps the reference's set at every TP size (fp32 sums are off by ~1e-7
        # in mass); at T_lp == T the log-probs and entropy take the same ones (one pass)
        packet[:, 3:6] = K.single_stats(logits.double(), valid, self.inv_t)
        if self.inv_lp == self.inv_t:
            packet[:, :3] = packet[:, 3:6]
        else:
            packet[:, :3] = K.single_stats(logits, valid, self.inv_lp)
        vals = packet[:, 6 : 6 + c + 1]
        ids = packet[:, 6 + c + 1 :]
        vals.fill_(_NEG_INF)
        ids.fill_(-1.0)
        kk = min(c + 1, valid)
        if kk > 0:
            top_v, top_i = torch.topk(logits[:, :valid].float(), kk, dim=-1)
            vals[:, :kk] = top_v.double()
            ids[:, :kk] = (top_i + self.shard.start).double()
        g = self._gather(packet)  # [tp, n, cols]
        lse_lp, entropy = merge_single(g[..., 0], g[..., 1], g[..., 2])
        lse_t, _ = merge_single(g[..., 3], g[..., 4], g[..., 5])
        cand_v = g[..., 6 : 6 + c].permute(1, 0, 2).reshape(n, self.tp * c)
        cand_i = g[..., 7 + c : 7 + 2 * c].permute(1, 0, 2).reshape(n, self.tp * c)
        threshold = g[..., 6 + c].amax(0)  # the largest logit that is not a candidate
        by_id = torch.argsort(torch.where(cand_i < 0, float(self.vocab_size), cand_i), dim=-1,
                              stable=True)  # fmt: skip
        cand_v, cand_i = cand_v.gather(1, by_id), cand_i.gather(1, by_id)
        sorted_v, order = torch.sort(cand_v, dim=-1, descending=True, stable=True)
        sorted_i = cand_i.gather(1, order)
        known = sorted_v > threshold[:, None]
        p = self.params
        choice, sufficient = filtered_draw(sorted_v, known, lse_t, self.inv_t, p.top_k, p.top_p, u)
        if bool(sufficient.all()):
            tokens = sorted_i.gather(1, choice[:, None]).squeeze(1).long()
            raw = sorted_v.gather(1, choice[:, None]).squeeze(1)
        else:
            tokens, raw = self._fallback(logits, lse_t, u)
        logprobs = raw * self.inv_lp - lse_lp
        return tokens, logprobs.float(), entropy.float()

    def _fallback(self, logits, lse_t, u):
        """Gather the full logits and draw from all of them (same uniforms, same semantics)."""
        self.counters["fallbacks"] += 1
        if self.params.top_k == 0:  # top-p alone: ask for more candidates next time
            self.c = min(2 * self.c, self.shard.width)
        local = logits.float().contiguous()
        if self.tp > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local, group=self.group)
            self.counters["elements"] += local.numel() * self.tp
            local = torch.cat(parts, dim=-1)
        full = local[:, : self.vocab_size].double()
        sorted_v, order = torch.sort(full, dim=-1, descending=True, stable=True)
        known = torch.ones_like(sorted_v, dtype=torch.bool)
        p = self.params
        choice, _ = filtered_draw(sorted_v, known, lse_t, self.inv_t, p.top_k, p.top_p, u,
                                  complete=True)  # fmt: skip
        tokens = order.gather(1, choice[:, None]).squeeze(1)
        return tokens, sorted_v.gather(1, choice[:, None]).squeeze(1)
