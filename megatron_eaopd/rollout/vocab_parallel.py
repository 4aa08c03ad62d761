"""Vocab-parallel next-token sampling: the vocabulary is never gathered on the common path.

Each TP rank holds columns [r * V_pad / tp, (r + 1) * V_pad / tp) of the last position's logits
(megatron's vocab-parallel output layer, ``runtime_gather_output=False``). Per decode step:

- Plain sampling (top-k off, top-p 1, the training rollouts): every shard adds the counter-based
  Gumbel noise of its own global columns (``sampling.gumbel_noise``) to logits / T and keeps its
  best (score, global id) and the candidate's logit; the same packet carries the shard's softmax
  statistics at the log-prob temperature (max, sum-exp, entropy numerator; the losses' kernels).
  ONE all-gather of [n, 6] float64 per step; every rank then merges identically in float64: the
  token is the best score over shards (ties: the lowest id), its log-prob is
  logit / T_lp - lse, the entropy comes from ``merge_single``. Same tokens at every TP size.
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

import torch
import torch.distributed as dist

from megatron_eaopd.losses import _kernels as K
from megatron_eaopd.losses._common import merge_single
from megatron_eaopd.parallel.groups import all_gather_rows, tp_rank_and_size
from megatron_eaopd.parallel.vocab import vocab_shard
from megatron_eaopd.rollout.sampling import (
    SamplingParams,
    column_keys,
    filtered_draw,
    gumbel_noise,
    row_keys,
    step_randoms,
)

__all__ = ["VocabParallelSampler"]

_NEG_INF = float("-inf")


class VocabParallelSampler:
    """Draws one token per row from vocab-parallel logit shards (see the module docstring).

    Args:
        params: the sampling settings.
        vocab_size: the real vocabulary; padded columns are never sampled.
        width: this rank's shard width V_pad / tp.
        tp_group: the tensor-parallel group (None: a single rank, no communication).
        device: where the logits live.
        candidates: first candidate count per shard for top-p without top-k (default 64).
    Attributes:
        counters: steps, fallbacks (full gathers), tokens (rows sampled), elements (elements of
            every collective this sampler made, as seen by this rank's output buffers).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, width: int, tp_group=None,
                 device=None, candidates: int = 64):  # fmt: skip
        self.params = params
        self.group = tp_group
        self.rank, self.tp = tp_rank_and_size(tp_group)
        self.shard = vocab_shard(width, self.rank, self.tp, vocab_size)
        self.vocab_size = vocab_size
        self.inv_t = 1.0 / params.temperature
        self.inv_lp = 1.0 / params.lp_temperature
        self.filtered = params.filtered
        self.c = min(params.top_k or candidates, max(1, self.shard.width))
        self.ckeys = None if self.filtered else column_keys(self.shard.start, self.shard.valid,
                                                            device)  # fmt: skip
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
        if logits.shape[-1] != self.shard.width:
            raise ValueError(f"logits shard has {logits.shape[-1]} columns, expected "
                             f"{self.shard.width}")  # fmt: skip
        self.counters["steps"] += 1
        self.counters["tokens"] += logits.shape[0]
        key, u = step_randoms(generator, batch, self.filtered)
        if self.filtered:
            return self._filtered(logits, u[rows.cpu()].to(logits.device))
        return self._plain(logits, key, rows)

    # ------------------------------------------------------------------ plain (Gumbel-max)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        out = all_gather_rows(local, self.group)
        if self.tp > 1:
            self.counters["elements"] += out.numel()
        return out

    def _plain(self, logits, key, rows):
        n, valid = logits.shape[0], self.shard.valid
        packet = torch.empty(n, 6, dtype=torch.float64, device=logits.device)
        packet[:, :3] = K.single_stats(logits, valid, self.inv_lp)
        if valid > 0:
            x = logits[:, :valid]
            noise = gumbel_noise(row_keys(key, rows.to(logits.device)), self.ckeys)
            best, arg = (x.double() * self.inv_t + noise).max(-1)
            packet[:, 3] = best
            packet[:, 4] = arg + self.shard.start
            packet[:, 5] = x.gather(1, arg[:, None]).squeeze(1).double() * self.inv_lp
        else:  # a shard of padding only
            packet[:, 3:] = torch.tensor([_NEG_INF, 0.0, 0.0], dtype=torch.float64)
        g = self._gather(packet)  # [tp, n, 6]
        lse, entropy = merge_single(g[..., 0], g[..., 1], g[..., 2])
        win = g[..., 3].argmax(0, keepdim=True)  # the first maximum: the lowest global id
        tokens = g[..., 4].gather(0, win).squeeze(0).long()
        logprobs = g[..., 5].gather(0, win).squeeze(0) - lse
        return tokens, logprobs.float(), entropy.float()

    # ------------------------------------------------------------------ top-k / top-p

    def _filtered(self, logits, u):
        n, valid, c = logits.shape[0], self.shard.valid, self.c
        cols = 6 + 2 * (c + 1)
        packet = torch.empty(n, cols, dtype=torch.float64, device=logits.device)
        packet[:, :3] = K.single_stats(logits, valid, self.inv_lp)
        packet[:, 3:6] = K.single_stats(logits, valid, self.inv_t)
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
