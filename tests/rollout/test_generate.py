"""Rollouts: KV-cache decoding equals full-recompute decoding, and the kept log-probs and entropies
equal a fresh forward of the finished sequences (TP 1 and 2, PP 2, TP 2 x PP 2 on 4 processes;
gloo)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_eaopd.rollout import SamplingParams, filter_logits, sample_tokens
from tests.dist import run_distributed

VOCAB, PAD = 16, 0


def _model(tp, seed=7, pp=1, untied=False, divisible=8, layers=2):
    from megatron_eaopd.models import ModelConfig, build_model, init_weights_layout_invariant
    from megatron_eaopd.parallel.init import initialize_parallel

    initialize_parallel(tp, pp, seed=1)
    cfg = ModelConfig(
        num_layers=layers, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, vocab_size=VOCAB, max_sequence_length=40,
        make_vocab_size_divisible_by=divisible, untie_embeddings_and_output_weights=untied,
    )  # fmt: skip
    (model,) = build_model(cfg)
    # a large init makes the distributions peaked enough that EOS and varied lengths happen
    init_weights_layout_invariant([model], seed, std=0.3)
    return model


def _prompts():
    gen = torch.Generator().manual_seed(3)
    lens = [1, 4, 7, 7, 2, 5]
    return [[1] + torch.randint(4, VOCAB, (n - 1,), generator=gen).tolist() for n in lens]


def _rollout_worker(rank, world, params_kw, pp=1, layers=2):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.losses import vocab_parallel_logprobs_and_entropy
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.parallel.init import compute_device
    from megatron_eaopd.rollout import generate

    dev = compute_device()  # the CPU here; a GPU in tests/rollout/test_cuda.py
    model = _model(world // pp, pp=pp, layers=layers)
    params = SamplingParams(**params_kw)
    kw = dict(max_new_tokens=12, pad_id=PAD, vocab_size=VOCAB, params=params)
    # EOS: a token this random model emits often (so responses end at different lengths)
    probe = generate(model, _prompts(), generator=torch.Generator().manual_seed(5), eos_id=-1, **kw)
    counts = torch.bincount(probe.tokens[probe.response_mask()], minlength=VOCAB)
    counts[PAD] = 0
    kw["eos_id"] = eos = int(counts.argmax())
    out, stats = {}, {}
    # KV cache (FastDecoder at PP 1, chunks with compaction after every finished row),
    # continuous batching (PP 1; chunks at PP 2), megatron's own KV cache without compaction,
    # and full recompute: the same rollouts
    variants = {
        "fast": dict(use_kv_cache=True, compact_frac=0.01, continuous=False, pp_interleave=True),
        "fast, one batch": dict(
            use_kv_cache=True, compact_frac=0.01, continuous=False, pp_interleave=False
        ),
        "continuous": dict(use_kv_cache=True),
        # decode steps at static shapes: CUDA graphs on a GPU, eager on the CPU; PP: ignored
        "fast, static": dict(
            use_kv_cache=True, compact_frac=0.01, continuous=False, decode_graphs=True
        ),
        "continuous, static": dict(use_kv_cache=True, decode_graphs=True),
        "megatron": dict(use_kv_cache=True, fast_decode=False, compact_frac=None),
        "recompute": dict(use_kv_cache=False),
    }
    for name, v in variants.items():
        gen = torch.Generator().manual_seed(11)
        stats[name] = {}
        out[name] = generate(model, _prompts(), generator=gen, max_batch=4, stats=stats[name],
                             **v, **kw)  # fmt: skip
    assert stats["fast"]["fast"] == 2  # both chunks (every stage under PP), no fallback
    # under PP each chunk's rows decode as PP interleaved groups (the same tokens, below)
    assert stats["fast"]["interleaved"] == (2 if pp > 1 else 0)
    assert stats["megatron"]["interleaved"] == stats["fast, one batch"]["interleaved"] == 0
    assert stats["fast, one batch"]["fast"] == 2
    assert stats["megatron"]["fast"] == 0 and stats["megatron"]["compactions"] == 0
    assert stats["fast"]["compactions"] > 0
    assert stats["fast"]["decode_rows"] < stats["megatron"]["decode_rows"]
    assert stats["continuous"]["continuous"] == (1 if pp == 1 else 0)
    for name in ("fast, static", "continuous, static"):
        st, cuda = stats[name], dev.type == "cuda"
        static_steps = st["graph_replays"] + st["static_eager"]
        # at PP 1 every step after a chunk's prefill is a static-shape step (continuous
        # batching: every step with live rows), replayed from a graph on CUDA (captured once
        # per new shape); under PP none
        if pp > 1:
            assert static_steps == 0, (name, st)
        elif name == "fast, static":
            assert static_steps == st["steps"] - st["fast"], st
        else:
            assert 0 < static_steps < st["steps"], st
        assert st["static_eager"] == 0 if cuda else st["graph_replays"] == 0, (name, st)
        assert (0 < st["graph_captures"] < st["graph_replays"]) == (cuda and pp == 1), (name, st)
    assert stats["fast, static"]["compactions"] > 0
    a = out["fast"]
    for b in (out["fast, one batch"], out["continuous"], out["fast, static"],
              out["continuous, static"], out["megatron"], out["recompute"]):  # fmt: skip
        assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
        assert torch.equal(a.response_lens, b.response_lens)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.entropies, b.entropies, atol=1e-5, rtol=1e-5)
    # a fresh training-style forward of the finished sequences gives the same log-probs
    model.eval()
    with torch.no_grad():
        s = a.tokens.shape[1]
        tokens = a.tokens.to(dev)
        pos = torch.arange(s, device=dev).unsqueeze(0).expand_as(tokens)
        if pp == 1:
            logits = model(tokens, pos, None)  # [b, s, V_pad / tp]
        else:  # a forward-only pass through megatron's pipeline schedule
            scored = FrozenTeacher([model]).score([{"tokens": tokens, "position_ids": pos}],
                                                  s, a.tokens.shape[0])  # fmt: skip
            if not ps.is_pipeline_last_stage():
                return _summary(a, eos)
            logits = scored[0].transpose(0, 1)  # [s, b, V_pad / tp] -> [b, s, ...]
        labels = torch.roll(tokens, -1, dims=1)
        t_lp = params.logprob_temperature or params.temperature
        fresh, fresh_ent = vocab_parallel_logprobs_and_entropy(
            logits.float(), labels.unsqueeze(-1), temperature=t_lp, vocab_size=VOCAB
        )
        fresh, fresh_ent = fresh.cpu(), fresh_ent.cpu()
    mask = a.response_mask()
    shifted = torch.roll(mask, -1, dims=1)  # logits at t-1 predict the response token at t
    shifted[:, -1] = False
    torch.testing.assert_close(fresh[..., 0][shifted], a.logprobs[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh_ent[shifted], a.entropies[mask], atol=1e-5, rtol=1e-5)
    return _summary(a, eos)


def _summary(a, eos):
    return {
        "tokens": a.tokens,
        "lens": a.response_lens,
        "prompt_lens": a.prompt_lens,
        "finished": a.finished,
        "eos": eos,
    }


PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.8, top_k=5, logprob_temperature=1.0),
]


def _all_params_worker(rank, world):
    return [_rollout_worker(rank, world, kw) for kw in PARAMS]


def test_kv_cache_equals_recompute_and_logprobs_equal_fresh_forward():
    """TP 1 and TP 2: FastDecoder with compaction == megatron's KV cache == recompute, log-probs
    == a fresh forward, and the same tokens at both TP sizes (vocab-parallel sampling draws the
    same noise per global vocabulary id; the layout-invariant init gives the same network)."""
    by_tp = {tp: run_distributed(_all_params_worker, tp, timeout=300) for tp in (1, 2)}
    for i in range(len(PARAMS)):
        for results in by_tp.values():
            _check_rollouts([res[i] for res in results])
        assert torch.equal(by_tp[1][0][i]["tokens"], by_tp[2][0][i]["tokens"])


def _pp_worker(rank, world, pp):
    out = [_rollout_worker(rank, world, kw, pp=pp) for kw in PARAMS]
    expected, eos = out[0]["tokens"], out[0]["eos"]
    # each on every rank (they pair collectives)
    fallback = _pp_fallback(expected, eos) and _pp_fallback(expected, eos, interleave=True)
    fallback = fallback and _pp_unsupported(expected, eos)
    disagree = _pp_disagree(expected, eos)
    return out + [fallback and disagree]


def _pp_generate(eos, stats, interleave=False):
    """The PP 2 model's rollouts of the first sampling setting, as the "fast" variant asks
    (``interleave``: as interleaved groups)."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout import generate

    return generate(_model(ps.get_tensor_model_parallel_world_size(), pp=2), _prompts(),
                    max_new_tokens=12, pad_id=PAD, vocab_size=VOCAB, eos_id=eos,
                    params=SamplingParams(**PARAMS[0]), max_batch=4, stats=stats,
                    generator=torch.Generator().manual_seed(11), compact_frac=0.01,
                    continuous=False, pp_interleave=interleave)  # fmt: skip


def _pp_disagree(expected, eos):
    """FastDecoder unsupported on the last stage only (a reason only one stage can have, such as
    a missing final norm): every stage must take megatron's forward (a stage on FastDecoder
    alone would pair its p2p with the wrong ones and hang); the same tokens."""
    import warnings

    from megatron.core import parallel_state as ps

    from megatron_eaopd.rollout.fast_decode import FastDecoder

    original = FastDecoder.unsupported
    FastDecoder.unsupported = staticmethod(
        lambda module: "test" if getattr(module, "post_process", True) else original(module)
    )
    try:
        stats = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _pp_generate(eos, stats)
    finally:
        FastDecoder.unsupported = original
    # the stage that cannot use it says why (a TE-spec model is the common case)
    warned = any("does not support this model (test)" in str(w.message) for w in caught)
    last = ps.is_pipeline_last_stage()
    return stats["fast"] == 0 and torch.equal(out.tokens, expected) and warned == last


def _pp_fallback(expected, eos, interleave=False):
    """FastDecoder's first logits made to differ from megatron's on the last stage only: every
    stage must learn the last stage's verdict and fall back together (a stage continuing alone
    would pair its p2p with the wrong ones and hang); the tokens are those of the fast path.
    ``interleave``: the groups of each chunk fall back and run one after another."""
    import warnings

    from megatron_eaopd.rollout.fast_decode import FastDecoder

    original = FastDecoder.forward

    def wrong(self, *a, **k):
        out = original(self, *a, **k)
        return None if out is None else out + 1.0

    FastDecoder.forward = wrong
    try:
        stats = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _pp_generate(eos, stats, interleave)
    finally:
        FastDecoder.forward = original
    warned = any("differ from megatron" in str(w.message) for w in caught)
    fell_back = stats["fast"] == 0 and stats["interleaved"] == 0
    return warned and fell_back and torch.equal(out.tokens, expected)


def _pp_unsupported(expected, eos):
    """A model FastDecoder does not support, with pp_interleave on: one batch per chunk
    through megatron's forward (the same steps as with it off, not PP groups run one after
    another), nothing interleaved, the same tokens."""
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    original = FastDecoder.unsupported
    FastDecoder.unsupported = staticmethod(lambda module: "a layout it does not model")
    try:
        steps = []
        for interleave in (False, True):
            stats = {}
            out = _pp_generate(eos, stats, interleave)
            steps.append(stats["steps"])
            assert stats["interleaved"] == 0 and stats["fast"] == 0
            assert torch.equal(out.tokens, expected)
    finally:
        FastDecoder.unsupported = original
    return steps[0] == steps[1]


def test_rollouts_under_pipeline_parallelism():
    """PP 2: FastDecoder on every stage (hidden states by p2p), the last stage samples and
    broadcasts; every rank returns the same rollouts, FastDecoder == megatron's KV cache ==
    recompute, and the log-probs equal a pipelined fresh forward; the same tokens as the PP 1
    model (layout-invariant init, same generator); a FastDecoder mismatch seen by the last stage
    makes every stage fall back to megatron's forward together, and so does FastDecoder being
    unsupported on one stage only."""
    results = run_distributed(_pp_worker, 2, 2, timeout=300)
    reference = run_distributed(_all_params_worker, 1, timeout=300)[0]
    for i in range(len(PARAMS)):
        _check_rollouts([res[i] for res in results])
        assert torch.equal(results[0][i]["tokens"], reference[i]["tokens"])
    assert all(res[-1] is True for res in results)  # the fallback: together, same tokens


# slow (20 s on 2 cores): the default run decodes at TP 2 x PP 2 in the trainer tests
# (tests/trainer/test_pipeline.py, test_dp_layouts.py), where FastDecoder's first-step check
# against megatron's forward must pass on every stage (no fallback is asserted there)
@pytest.mark.slow
def test_rollouts_under_tp2_pp2():
    results = run_distributed(_pp_worker, 4, 2, timeout=600)
    for i in range(len(PARAMS)):
        _check_rollouts([res[i] for res in results])


def _pp3_worker(rank, world):
    return _rollout_worker(rank, world, PARAMS[0], pp=world, layers=3)


@pytest.mark.slow  # 3 processes
def test_rollouts_under_pp3():
    """PP 3: a middle stage receives and sends (FastDecoder's and megatron's p2p chains);
    FastDecoder on every stage == megatron's forward == recompute, log-probs equal a pipelined
    fresh forward, and the same tokens as the same 3-layer model at PP 1."""
    results = run_distributed(_pp3_worker, 3, timeout=600)
    reference = run_distributed(_pp3_worker, 1, timeout=300)[0]
    _check_rollouts(results)
    assert torch.equal(results[0]["tokens"], reference["tokens"])


def _check_rollouts(results):
    r = results[0]
    for other in results[1:]:  # every TP rank returns the same rollouts
        assert torch.equal(other["tokens"], r["tokens"])
    prompts, eos = _prompts(), r["eos"]
    for i, p in enumerate(prompts):
        assert r["tokens"][i, : len(p)].tolist() == p  # prompts untouched
        n = int(r["lens"][i])
        assert 1 <= n <= 12
        resp = r["tokens"][i, len(p) : len(p) + n].tolist()
        assert eos not in resp[:-1]
        assert bool(r["finished"][i]) == (resp[-1] == eos)
        assert (r["tokens"][i, len(p) + n :] == PAD).all()
    assert len(set(r["lens"].tolist())) > 1, "expected responses of several lengths"


def test_filter_and_sample_respect_top_k_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=gen) * 3
    kept = filter_logits(logits, top_k=4)
    assert ((kept > float("-inf")).sum(-1) == 4).all()
    probs = torch.softmax(logits, -1)
    kept = filter_logits(logits, top_p=0.5)
    for row_p, row_k in zip(probs, kept):
        mask = row_k > float("-inf")
        # the kept set reaches the mass, and dropping its least likely member would not
        assert row_p[mask].sum() >= 0.5 - 1e-6
        assert row_p[mask].sum() - row_p[mask].min() < 0.5 + 1e-6
    params = SamplingParams(temperature=1.0, top_k=3)
    counts = torch.zeros(30)
    for _ in range(200):
        tok, lp, ent = sample_tokens(logits[:1], params, gen)
        counts[tok] += 1
        torch.testing.assert_close(lp, torch.log_softmax(logits[:1], -1)[0, tok])
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) <= top3


def test_sampling_frequencies_follow_the_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    tok, _, ent = sample_tokens(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(tok, minlength=4).double() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.03, rtol=0)
    p = torch.softmax(logits[0], -1)
    torch.testing.assert_close(ent[0], -(p * p.log()).sum())


def _bad_arguments_worker(rank, world):
    from megatron_eaopd.rollout import generate

    model = _model(world)
    kw = dict(max_new_tokens=4, eos_id=2, pad_id=PAD, vocab_size=VOCAB, params=SamplingParams(),
              generator=torch.Generator().manual_seed(0))  # fmt: skip
    cases = {
        "no prompts": ([], {}),
        "max_new_tokens must be >= 1": (_prompts(), dict(max_new_tokens=0)),
        "max_batch must be an int >= 1": (_prompts(), dict(max_batch=0)),
        "compact_frac must be in (0, 1]": (_prompts(), dict(compact_frac=0.0)),
        "generator must be a CPU torch.Generator": (_prompts(), dict(generator=5)),
        "leaves no room to generate": ([[1] * 40], {}),
        "outside the vocabulary of 16": (_prompts(), dict(eos_id=[2, VOCAB])),
        "non-empty list of ids": (_prompts(), dict(eos_id=[])),
        # an id outside the embedding: IndexError at TP 1, a silent zero vector at TP 2
        "prompt 1 holds token id 16 outside [0, vocab_size=16)": ([[1, 2], [3, VOCAB]], {}),
        "prompt 0 holds token id -1": ([[-1, 2]], {}),
        # text and float ids raised TypeErrors ('<' not supported, float as an integer)
        "prompt 1 holds 'hello', not an integer token id": ([[1, 2], [1, "hello"]], {}),
        "prompt 0 holds 2.0, not an integer token id": ([[1, 2.0]], {}),
        "prompt 0 holds 1180591620717411303424, outside the int64 range": ([[1, 2**70]], {}),
        "pad_id=-1 must be an int in [0, vocab_size=16)": (_prompts(), dict(pad_id=-1)),
        "pad_id=16 must be an int in [0, vocab_size=16)": (_prompts(), dict(pad_id=VOCAB)),
        "max_new_tokens must be an int": (_prompts(), dict(max_new_tokens=2.5)),
        "prompts as a tensor must be [n, s] integer ids": (torch.ones(2, 3), {}),
    }
    messages = {}
    for expected, (prompts, over) in cases.items():
        try:
            generate(model, prompts, **(kw | over))
            messages[expected] = None
        except ValueError as exc:
            messages[expected] = str(exc)
    return messages


def test_generate_rejects_bad_arguments_with_clear_errors():
    (messages,) = run_distributed(_bad_arguments_worker, 1)
    for expected, got in messages.items():
        assert got is not None and expected in got, (expected, got)


def test_sampling_params_refuse_what_they_used_to_take():
    """A log-prob temperature of 0 became the sampling temperature, a negative or NaN one gave
    wrong or NaN log-probs; an infinite temperature and a fractional or boolean top_k passed."""
    for kw, word in ((dict(logprob_temperature=0.0), "logprob_temperature"),
                     (dict(logprob_temperature=-1.0), "logprob_temperature"),
                     (dict(logprob_temperature=math.nan), "logprob_temperature"),
                     (dict(temperature=math.inf), "temperature"),
                     (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
                     # 1/T overflowed fp32: 40% of the tokens were not the argmax, silently
                     (dict(temperature=1e-38), "top_k=1 decodes greedily")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kw)
    assert SamplingParams(temperature=0.7).lp_temperature == 0.7
    assert SamplingParams(temperature=0.7, logprob_temperature=1.0).lp_temperature == 1.0
    assert SamplingParams(temperature=1e-6).temperature == 1e-6  # the smallest allowed


def _disagreeing_worker(rank, world):
    from megatron_eaopd.rollout import generate

    model = _model(world)
    results = {}
    for name, over in (("max_new_tokens", dict(max_new_tokens=5)),
                       ("seed", dict(generator=torch.Generator().manual_seed(9))),
                       ("prompts", dict(prompts=_prompts()[:-1])),
                       ("max_batch", dict(max_batch=2)),  # aborted in gloo (a size mismatch)
                       ("use_kv_cache", dict(use_kv_cache=False)),  # hung
                       ("compact_frac", dict(compact_frac=0.01))):  # fmt: skip
        kw = dict(prompts=_prompts(), max_new_tokens=4, eos_id=2, pad_id=PAD, vocab_size=VOCAB,
                  params=SamplingParams(), generator=torch.Generator().manual_seed(0))  # fmt: skip
        if rank == 1:
            kw |= over
        prompts = kw.pop("prompts")
        try:
            generate(model, prompts, **kw)
            results[name] = None
        except ValueError as exc:
            results[name] = str(exc)
    same = generate(model, _prompts(), max_new_tokens=4, eos_id=2, pad_id=PAD, vocab_size=VOCAB,
                    params=SamplingParams(top_k=VOCAB), generator=torch.Generator().manual_seed(0),
                    stats=(stats := {}))  # fmt: skip
    plain = generate(
        model,
        _prompts(),
        max_new_tokens=4,
        eos_id=2,
        pad_id=PAD,
        vocab_size=VOCAB,
        params=SamplingParams(),
        generator=torch.Generator().manual_seed(0),
    )
    results["top_k=V is plain"] = (torch.equal(same.tokens, plain.tokens), stats["fallbacks"])
    return results


def test_tp_ranks_called_with_different_arguments_raise_on_every_rank():
    """At TP 2 a rank with other prompts, another max_new_tokens, seed, max_batch, KV-cache or
    compaction setting aborted the
    process in a collective of mismatched sizes, or returned tokens of neither rank's seed: one
    fingerprint all-gather per call now raises the same ValueError on both ranks. A top-k of
    the whole vocabulary samples as plain sampling (it fell back to a full gather per step)."""
    for results in run_distributed(_disagreeing_worker, 2):
        for name in ("max_new_tokens", "seed", "prompts", "max_batch", "use_kv_cache",
                     "compact_frac"):  # fmt: skip
            assert results[name] and "called with different arguments" in results[name], name
        assert results["top_k=V is plain"] == (True, 0)


def _stop_ids_worker(rank, world):
    from megatron_eaopd.rollout import generate

    model = _model(world)
    prompts = _prompts() * 2
    kw = dict(max_new_tokens=12, pad_id=PAD, vocab_size=VOCAB, params=SamplingParams())
    free = generate(model, prompts, generator=torch.Generator().manual_seed(5), eos_id=-1, **kw)
    counts = torch.bincount(free.tokens[free.response_mask()], minlength=VOCAB)
    counts[PAD] = 0
    stops = counts.argsort(descending=True)[:2].tolist()  # two ids this model emits often
    variants = {
        "fast": dict(compact_frac=0.01, continuous=False),
        "continuous": dict(max_batch=5),
        "megatron": dict(fast_decode=False, compact_frac=None),
        "recompute": dict(use_kv_cache=False),
    }
    out = {
        name: generate(
            model, prompts, generator=torch.Generator().manual_seed(5), eos_id=stops, **v, **kw
        )  # fmt: skip
        for name, v in variants.items()
    }
    return free, stops, out


def test_generation_stops_at_any_of_several_stop_ids():
    """eos_id as a list (generation_config.json's eos_token_id, e.g. Qwen3's two): each response
    is the unstopped response cut after its first stop id, whichever it is, in every decoder
    (TP 2). The draws do not depend on where rows stop, so the unstopped run is the reference."""
    free, stops, out = run_distributed(_stop_ids_worker, 2)[0]
    cut_by = set()
    for name, got in out.items():
        for i in range(len(free.prompt_lens)):
            whole = free.response_ids(i)
            ends = [t for t, tok in enumerate(whole) if tok in stops]
            want = whole[: ends[0] + 1] if ends else whole
            assert got.response_ids(i) == want, (name, i, stops)
            assert bool(got.finished[i]) == bool(ends), (name, i)
            if ends:
                cut_by.add(whole[ends[0]])
    assert cut_by == set(stops), cut_by  # both ids ended some response


def test_stop_ids_take_what_an_eos_id_comparison_took():
    """generate's eos_id compared `new == eos_id` before lists: numpy and 0-d tensor ids worked
    and must keep working; bools, floats, strings and empty lists are refused."""
    import numpy as np

    from megatron_eaopd.rollout.batch import stop_ids

    for value, want in [(5, [5]), (np.int64(5), [5]), (torch.tensor(5), [5]), (-1, [-1]),
                        (torch.tensor([5, 3]), [3, 5]), (np.array([5, 2]), [2, 5]),
                        ([np.int64(5), 5], [5])]:  # fmt: skip
        assert stop_ids(value, VOCAB).tolist() == want, value
    for value in ([], True, [True], 2.0, "5", None):
        with pytest.raises(ValueError, match="an id or a non-empty list of ids"):
            stop_ids(value, VOCAB)
    tokens = torch.tensor([[1, 5], [3, 7]])
    assert torch.isin(tokens, stop_ids([3, 5], VOCAB)).tolist() == [[False, True], [True, False]]
    assert torch.isin(tokens, stop_ids(7, VOCAB)).tolist() == [[False, False], [False, True]]


def test_split_rows_into_interleaved_groups():
    from megatron_eaopd.rollout.interleave import split_rows

    for rows in range(1, 12):
        for groups in range(1, 5):
            parts = split_rows(rows, groups)
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous
            sizes = [hi - lo for lo, hi in parts]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert len(parts) == min(rows, groups)


def _reused_generator_worker(rank, world):
    """Two generate calls with one generator under PP 2 (the second interleaved): only the last
    stage sampled, so the first stage's generator stayed behind and the second call was refused
    as 'called with different arguments'. Returns the calls' tokens and the final state."""
    from megatron_eaopd.rollout import generate

    model, gen = _model(1, pp=world), torch.Generator().manual_seed(0)
    tokens = [
        generate(model, _prompts(), max_new_tokens=6, pad_id=PAD, vocab_size=VOCAB, eos_id=-1,
                 params=SamplingParams(**kw), generator=gen, pp_interleave=i == 1).tokens
        for i, kw in enumerate([PARAMS[0], {"temperature": 0.7, "top_k": 5}])
    ]  # fmt: skip
    return tokens, gen.get_state()


def test_a_generator_reused_under_pp_stays_in_step_over_the_stages():
    results = run_distributed(_reused_generator_worker, 2, timeout=300)
    (first, state0), (second, state1) = results
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(state0, state1)
    reference = run_distributed(_reused_generator_worker, 1, timeout=300)[0]
    # the same tokens and draws as one process (PP 1) running both calls
    assert all(torch.equal(a, b) for a, b in zip(reference[0], first, strict=True))
    assert torch.equal(reference[1], state0)
