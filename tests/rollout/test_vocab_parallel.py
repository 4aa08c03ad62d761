"""Vocab-parallel sampling at TP 1, 2 and 4 (one 4-process gloo launch, TP 2 as two subgroups):
token frequencies follow the full-vocabulary distribution (chi-square, fixed seeds), the draws are
the single-rank reference's at every TP size, log-probs and entropies equal a float64 reference,
and the elements communicated per token do not depend on the vocabulary size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_eaopd.rollout import SamplingParams
from megatron_eaopd.rollout.sampling import filter_logits, plain_block, sample_tokens
from megatron_eaopd.rollout.vocab_parallel import VocabParallelSampler
from tests.dist import run_distributed

ROWS = 4000  # draws per setting (one step of ROWS identical rows)
# (vocab, padded vocab): shard widths not multiples of 64 (one Gumbel per column) and multiples
# of 64 at TP 1, 2 and 4 (the blocked two-level draw)
CASES = ((50, 56), (500, 504), (470, 512))
SETTINGS = {
    "plain": (SamplingParams(temperature=0.8, logprob_temperature=1.0), 64),
    # log-probs at the sampling temperature: the blocked draw's statistics come from its blocks
    "plain, lp at T": (SamplingParams(temperature=0.9), 64),
    "top-k": (SamplingParams(temperature=1.0, top_k=7), 64),
    "top-p": (SamplingParams(temperature=1.0, top_p=0.7), 64),
    "top-k+p": (SamplingParams(temperature=0.7, top_k=12, top_p=0.9, logprob_temperature=1.0), 64),
    # two candidates per shard cannot reach top_p = 0.95: the gather fallback
    "top-p fallback": (SamplingParams(temperature=1.0, top_p=0.95), 2),
}


def _settings(full: torch.Tensor, vocab: int) -> dict:
    """SETTINGS plus top-p 1e-12 above and below the float64 mass before the third most likely
    token: the kept set (2 or 3 tokens) must be the reference's at every TP size, which fp32
    shard statistics (normaliser off by ~1e-7) do not give."""
    x = full[0, :vocab].double() / 0.7
    p = torch.sort(torch.softmax(x, -1), descending=True).values
    before = float(p[:2].sum())
    out = dict(SETTINGS)
    for sign in (1, -1):
        top_p = before + sign * 1e-12
        out[f"top-p boundary {sign:+d}"] = (SamplingParams(temperature=0.7, top_p=top_p), 64)
    return out


def _logits(vocab: int, v_pad: int) -> torch.Tensor:
    """[1, v_pad] logits; the padded columns are large (they must never be sampled)."""
    gen = torch.Generator().manual_seed(vocab)
    row = torch.randn(1, v_pad, generator=gen) * 1.3
    row[:, vocab:] = 30.0
    return row


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; categories with expected count < 5 are pooled."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _draw(full, vocab, params, cands, group, rank_in_group, tp):
    """One step of ROWS identical rows with this rank's shard; returns tokens, lp, ent, sampler."""
    width = full.shape[1] // tp
    shard = full[:, rank_in_group * width : (rank_in_group + 1) * width].expand(ROWS, width)
    sampler = VocabParallelSampler(params, vocab, width, group, candidates=cands)
    gen = torch.Generator().manual_seed(123)
    tokens, lp, ent = sampler.sample(shard.contiguous(), torch.arange(ROWS), gen, ROWS)
    return tokens, lp, ent, sampler


def _worker(rank, world):
    groups = {1: None, 4: dist.group.WORLD}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    groups[2] = pairs[rank // 2]
    counted = {"elements": 0}
    original = dist.all_gather_into_tensor, dist.all_gather
    single = getattr(dist, "all_gather_single", None)

    def count_single(out, *a, **k):
        counted["elements"] += out.numel()
        return (single or original[0])(out, *a, **k)

    def count_list(outs, *a, **k):
        counted["elements"] += sum(t.numel() for t in outs)
        return original[1](outs, *a, **k)

    dist.all_gather_into_tensor = count_single
    if single is not None:
        dist.all_gather_single = count_single
    dist.all_gather = count_list
    result = {}
    try:
        for vocab, v_pad in CASES:
            full = _logits(vocab, v_pad)
            for name, (params, cands) in _settings(full, vocab).items():
                for tp in (1, 2, 4):
                    counted["elements"] = 0
                    local_rank = rank % tp if tp > 1 else 0
                    tokens, lp, ent, sampler = _draw(full, vocab, params, cands, groups[tp],
                                                     local_rank, tp)  # fmt: skip
                    result[(vocab, name, tp)] = dict(
                        tokens=tokens, lp=lp, ent=ent, fallbacks=sampler.counters["fallbacks"],
                        elements=counted["elements"] / ROWS,
                    )  # fmt: skip
    finally:
        dist.all_gather_into_tensor, dist.all_gather = original
        if single is not None:
            dist.all_gather_single = single
    return result


def _reference(full, vocab, params):
    """float64 full-vocabulary references: sampling probabilities, log-probs, entropy."""
    x = full[0, :vocab].double()
    scaled = (x / params.temperature).unsqueeze(0)
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), -1)[0]
    logp = torch.log_softmax(x / params.lp_temperature, -1)
    return probs, logp, -(logp.exp() * logp).sum()


def test_vocab_parallel_sampling_tp_1_2_4():
    results = run_distributed(_worker, 4, timeout=300)
    p_values = {}
    for vocab, v_pad in CASES:
        full = _logits(vocab, v_pad)
        # plain sampling: one Gumbel per column where a shard width is not a multiple of 64,
        # else the blocked draw; the same block at every TP size of a case (checked)
        block = {plain_block(v_pad // tp) for tp in (1, 2, 4)}
        assert len(block) == 1
        block = block.pop()
        assert block == (64 if v_pad == 512 else 1)
        for name, (params, _) in _settings(full, vocab).items():
            probs, logp, entropy = _reference(full, vocab, params)
            # the single-rank reference sampler, same generator seed
            gen = torch.Generator().manual_seed(123)
            ref_tokens, _, _ = sample_tokens(full[:, :vocab].expand(ROWS, vocab), params, gen,
                                             block=block)  # fmt: skip
            for tp in (1, 2, 4):
                for rank in range(4):
                    r = results[rank][(vocab, name, tp)]
                    assert (r["tokens"] < vocab).all(), "a padded column was sampled"
                    same = (r["tokens"] == ref_tokens).double().mean()
                    assert same == 1.0, (vocab, name, tp, float(same))
                    torch.testing.assert_close(r["lp"].double(), logp[r["tokens"]], atol=1e-5,
                                               rtol=1e-5)  # fmt: skip
                    torch.testing.assert_close(r["ent"].double(), entropy.expand(ROWS),
                                               atol=1e-5, rtol=1e-5)  # fmt: skip
                r = results[0][(vocab, name, tp)]
                counts = torch.bincount(r["tokens"], minlength=vocab)
                assert counts[probs == 0].sum() == 0, "a token outside top-k / top-p was sampled"
                p_values[(vocab, name, tp)] = _chi_square_p(counts, probs)
                assert p_values[(vocab, name, tp)] > 1e-3, (vocab, name, tp, p_values)
                if name == "top-p fallback" and tp > 1:
                    assert r["fallbacks"] == 1
                elif tp > 1:
                    assert r["fallbacks"] == 0, (vocab, name, tp)
    print("chi-square p-values:", {k: round(v, 3) for k, v in p_values.items()})
    # communication per token: [tp, 6] for plain sampling, [tp, 6 + 2 (c + 1)] with top-k / top-p
    # (c = top_k or the candidate count, capped by the shard width): no term grows with the
    # vocabulary; only a fallback step gathers it. Nothing at TP 1.
    for vocab, v_pad in CASES:
        for name, (params, cands) in _settings(_logits(vocab, v_pad), vocab).items():
            for tp in (1, 2, 4):
                got = results[0][(vocab, name, tp)]["elements"]
                c = min(params.top_k or cands, v_pad // tp)
                want = 0 if tp == 1 else tp * (6 + 2 * (c + 1) if params.filtered else 6)
                if name == "top-p fallback" and tp > 1:
                    want += v_pad  # one gather of the full [ROWS, v_pad] logits
                assert got == want, (vocab, name, tp, got, want)
    plain = [results[0][(v, "plain", 2)]["elements"] for v, _ in CASES]
    assert plain == [12, 12, 12]


@pytest.mark.slow
def test_compiled_plain_kernel_equals_eager():
    """The torch.compile'd shard-local kernel draws the same tokens, statistics to rounding."""
    from megatron_eaopd.rollout.sampling import column_keys, row_keys
    from megatron_eaopd.rollout.vocab_parallel import _plain_local_eager

    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(_plain_local_eager, dynamic=True)
    for n, w in ((32, 4096), (7, 300)):
        x = torch.randn(n, w, generator=gen) * 2
        args = (x, row_keys(99, torch.arange(n)), column_keys(0, w), 1.25, 1.0)
        got, want = compiled(*args), _plain_local_eager(*args)
        assert torch.equal(got[:, 4], want[:, 4])  # the same columns win
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # log rounding differs


def test_blocked_draw_edge_cases():
    """Blocks without mass (all -inf) next to very negative logits: finite log-probs and
    entropies equal to float64 (the blocks' merge is shifted by live blocks only); a shard of
    fewer than 64 valid columns, all -inf (the last shard at TP 4): no error, never the winner."""
    import math

    from megatron_eaopd.parallel.vocab import vocab_shard
    from megatron_eaopd.rollout.sampling import row_keys

    x = torch.full((2, 128), -1000.0)
    x[:, :64] = -math.inf
    x[1, 64:] = torch.linspace(-3.0, 2.0, 64)
    sampler = VocabParallelSampler(SamplingParams(temperature=1.0), 128, 128)
    assert sampler.block == 64
    tokens, lp, ent = sampler.sample(x, torch.arange(2), torch.Generator().manual_seed(0), 2)
    logp = torch.log_softmax(x.double(), -1)
    assert (tokens >= 64).all()
    torch.testing.assert_close(lp.double(), logp.gather(1, tokens[:, None])[:, 0])
    want = -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)
    torch.testing.assert_close(ent.double(), want)
    sampler.shard = vocab_shard(128, 3, 4, 400)  # valid columns 16 of 128
    packet = sampler._blocked_local(torch.full((1, 16), -math.inf), row_keys(7, torch.arange(1)))
    assert packet[0, 3] == -math.inf and 0 <= packet[0, 4] < 16


@pytest.mark.parametrize("width,params", [
    (256, SamplingParams(temperature=0.9)),  # blocked, TP 1 without a packet
    (256, SamplingParams(temperature=0.9, logprob_temperature=1.0)),  # blocked, with a packet
    (250, SamplingParams(temperature=0.9)),  # one Gumbel per column
])  # fmt: skip
def test_row_hashes_once_per_call_same_draws(width, params):
    """A sampler told the call's row count (the rows' hashes computed once, looked up each step)
    draws exactly what a sampler without it draws and what the single-rank reference draws,
    for a subset of the call's rows in any order (after compaction or refills); the reference
    row ids follow the subset."""
    from megatron_eaopd.rollout.sampling import block_view, blocked_draw, row_keys

    gen = torch.Generator().manual_seed(5)
    rows = torch.tensor([6, 1, 3, 0])
    x = torch.randn(len(rows), width, generator=gen) * 2
    keys = torch.randint(0, 1 << 32, (len(rows),), generator=gen)
    once = VocabParallelSampler(params, width, width, rows=8)
    every = VocabParallelSampler(params, width, width)
    assert once.bases is not None and every.bases is None
    got, want = once.draw(x, rows, keys, None), every.draw(x, rows, keys, None)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # independent reference: the blocked draw / Gumbel-max on the full logits, float64 stats
    rkeys = row_keys(keys, rows)
    if once.block > 1:
        y = block_view(x.float() * (1.0 / params.temperature), once.block)
        tokens = blocked_draw(y, rkeys, 0, entropy=False)[1]
    else:
        from megatron_eaopd.rollout.sampling import column_keys, gumbel_noise

        noise = gumbel_noise(rkeys, column_keys(0, width))
        tokens = (x.double() / params.temperature + noise).argmax(-1)
    assert torch.equal(got[0], tokens)
    logp = torch.log_softmax(x.double() / params.lp_temperature, -1)
    tol = dict(atol=1e-5, rtol=1e-5)  # fp32 outputs
    torch.testing.assert_close(got[1].double(), logp.gather(1, tokens[:, None])[:, 0], **tol)
    torch.testing.assert_close(got[2].double(), -(logp.exp() * logp).sum(-1), **tol)


def test_blocked_draw_given_block_keys_and_one_hash_pass():
    """``blocked_draw`` with its blocks' keys passed in equals computing them; its one hash pass
    (block noise and inner keys together) equals hashing them separately as defined:
    noise ``gumbel_noise(rkeys, bkeys)``, inner uniform ``mix(mix(rkey ^ salt) ^ bkey)``."""
    from megatron_eaopd.rollout import sampling as S

    gen = torch.Generator().manual_seed(3)
    y = S.block_view(torch.randn(5, 320, generator=gen), 64)
    rkeys = S.row_keys(77, torch.arange(5))
    bkeys = S.column_keys(2, 5)
    a = S.blocked_draw(y, rkeys, 2)
    b = S.blocked_draw(y, rkeys, 2, bkeys=bkeys)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    top = y.amax(-1)
    z = torch.exp(y - top[..., None]).sum(-1)
    score = top.double() + z.double().log() + S.gumbel_noise(rkeys, bkeys)
    best, blk = score.max(-1)
    assert torch.equal(a[0], best)
    e = torch.exp(y - top[..., None])[torch.arange(5), blk].double()
    cdf = e.cumsum(-1)
    h = S._mix32(S._mix32(rkeys ^ S._INNER_SALT) ^ bkeys[blk])
    u = (h.double() + 0.5) / 2**32
    inner = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(a[1], blk * 64 + inner)


def test_tp1_shortcut_equals_packet_and_merge_bit_for_bit():
    """At TP 1 (T_lp == T, blocked draw) the sampler skips the [n, 6] packet and the one-shard
    merge; its tokens, log-probs and entropies equal that path's bit for bit, on ordinary,
    peaked and tied rows, a row with -inf columns, a row of -inf only and a row with a +inf
    logit (NaN log-prob on both paths)."""
    import math

    from megatron_eaopd.losses._common import merge_single
    from megatron_eaopd.rollout.sampling import row_keys

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 256, generator=gen)
    x[1] *= 40.0  # peaked
    x[2] = 0.5  # all tied
    x[3, :100] = -math.inf
    x[4] = -math.inf
    x[5, 17] = math.inf
    x[6] = x[6] * 1e-3 - 50.0  # far from 0
    sampler = VocabParallelSampler(SamplingParams(temperature=0.9), 256, 256, rows=7)
    rkeys = row_keys(torch.arange(7) * 977, torch.arange(7))
    got = sampler._blocked_single(x, rkeys)
    packet = sampler._blocked_local(x, rkeys)[None]  # [tp = 1, n, 6], as the gather returns
    lse, entropy = merge_single(packet[..., 0], packet[..., 1], packet[..., 2])
    want = (packet[0, :, 4].long(), (packet[0, :, 5] - lse).float(), entropy.float())
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), (a, b)
    assert got[1][5].isnan() and not got[1][[0, 1, 2, 3, 6]].isnan().any()
    # and the sampler takes the shortcut at TP 1
    tokens, lp, ent = sampler.draw(x, torch.arange(7), torch.arange(7) * 977, None)
    assert torch.equal(tokens, got[0]) and torch.equal(lp.nan_to_num(1.0), got[1].nan_to_num(1.0))
