"""Continuous batching: ``generate`` with more prompts than ``max_batch`` refills the rows of
finished sequences with waiting prompts; the rollouts equal one unbatched call (the position-aligned
decoder, a separate code path) token for token, with the same log-probs and entropies, at TP 1 and
TP 2 (gloo), on uneven prompts and a length-skewed workload (EOS made likely: most responses end
early, a few run to the limit)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.dist import run_distributed

VOCAB, PAD, EOS, NEW = 16, 0, 3, 16
PARAMS = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8, top_k=5, logprob_temperature=1.0)]


def _model(tp):
    """test_generate's model, untied, with the EOS row of the output layer scaled up."""
    from tests.rollout.test_generate import _model as base_model

    # the vocabulary padded to 64 per rank: plain sampling takes the blocked draw (per-row keys
    # of PositionRandoms, refills) at TP 1 and 2
    model = base_model(tp, untied=True, divisible=64)
    # skewed lengths: the EOS row of the output layer (vocab-parallel: the rank holding it)
    layer = model.output_layer
    start = layer.weight.shape[0] * _tp_rank()
    if start <= EOS < start + layer.weight.shape[0]:
        with torch.no_grad():
            layer.weight[EOS - start] *= 3.0
    return model


def _tp_rank():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def _prompts():
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 9, (21,), generator=gen).tolist()
    return [[1] + torch.randint(4, VOCAB, (n - 1,), generator=gen).tolist() for n in lens]


def _fresh_logprobs(model, a, t_lp):
    """Log-probs and entropies of a fresh training-style forward at the response positions."""
    from megatron_eaopd.losses import vocab_parallel_logprobs_and_entropy

    model.eval()
    with torch.no_grad():
        pos = torch.arange(a.tokens.shape[1]).unsqueeze(0).expand_as(a.tokens)
        logits = model(a.tokens, pos, None)  # [b, s, V_pad / tp]
        labels = torch.roll(a.tokens, -1, dims=1)
        lp, ent = vocab_parallel_logprobs_and_entropy(
            logits.float(), labels.unsqueeze(-1), temperature=t_lp, vocab_size=VOCAB
        )
    shifted = torch.roll(a.response_mask(), -1, dims=1)  # logits at t-1 predict the token at t
    shifted[:, -1] = False
    return lp[..., 0][shifted], ent[shifted]


def _worker(rank, world):
    from megatron_eaopd.rollout import SamplingParams, generate

    model, prompts = _model(world), _prompts()
    out = []
    for kw in PARAMS:
        params = SamplingParams(**kw)
        common = dict(max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB, params=params)
        runs, stats = {}, {}
        variants = {"unbatched": {}, "continuous": dict(max_batch=5, refill_frac=None),
                    "batched refills": dict(max_batch=5, refill_frac=0.6),  # 3 rows free
                    "chunks": dict(max_batch=5, continuous=False)}  # fmt: skip
        done = []
        for name, extra in variants.items():
            stats[name] = {}
            runs[name] = generate(
                model, prompts, generator=torch.Generator().manual_seed(11), stats=stats[name],
                progress=done.append if name == "continuous" else None, **extra, **common,
            )  # fmt: skip
        ref, cont = runs["unbatched"], runs["continuous"]
        for other in (cont, runs["batched refills"], runs["chunks"]):
            assert torch.equal(other.tokens, ref.tokens), (other.tokens, ref.tokens)
            assert torch.equal(other.response_lens, ref.response_lens)
            assert torch.equal(other.finished, ref.finished)
            torch.testing.assert_close(other.logprobs, ref.logprobs, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.entropies, ref.entropies, atol=1e-5, rtol=1e-5)
        s = stats["continuous"]
        assert s["continuous"] == 1 and s["prefills"] == len(prompts) and s["fast"] == 1
        assert stats["unbatched"]["continuous"] == 0 and stats["chunks"]["continuous"] == 0
        # every row runs through the model once per generated token (its prefill included), and
        # never after it finished; progress saw every sequence finish
        assert s["decode_rows"] == int(cont.response_lens.sum())
        assert sum(done) == len(prompts)
        batched = stats["batched refills"]
        assert batched["decode_rows"] == s["decode_rows"] and batched["refills"] < s["refills"]
        # the log-probs are those of a fresh forward of the finished sequences
        lp, ent = _fresh_logprobs(model, cont, params.lp_temperature)
        mask = cont.response_mask()
        torch.testing.assert_close(lp, cont.logprobs[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, cont.entropies[mask], atol=1e-5, rtol=1e-5)
        out.append({"tokens": ref.tokens, "lens": ref.response_lens, "stats": stats})
    out.append(_fallback_check(model, prompts, out[0]["tokens"]))
    return out


def _fallback_check(model, prompts, expected):
    """FastDecoder logits that disagree with megatron's forward: a warning, megatron's forward
    (in chunks), the same tokens. Only the LAST TP rank sees the mismatch (each rank checks its own
    vocabulary shard): every rank must still take the same path, for continuous batching (the
    first prefill) and for chunks (each chunk's first forward); one rank falling back alone paired
    its collectives with the wrong ones and hung."""
    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout.fast_decode import FastDecoder

    last = _tp_rank() == _tp_world() - 1
    same = True
    for name, extra in (("prefill_rows", dict(max_batch=5)),
                        ("forward", dict(max_batch=11, continuous=False))):  # fmt: skip
        original = getattr(FastDecoder, name)

        def wrong(self, *a, _original=original, **k):
            out = _original(self, *a, **k)
            return out + 1.0 if last else out

        setattr(FastDecoder, name, wrong)
        try:
            stats = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = generate(model, prompts, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD,
                               vocab_size=VOCAB, params=SamplingParams(), stats=stats,
                               generator=torch.Generator().manual_seed(11), **extra)  # fmt: skip
        finally:
            setattr(FastDecoder, name, original)
        assert any("differ from megatron" in str(w.message) for w in caught), name
        assert stats["continuous"] == 0 and stats["fast"] == 0, (name, stats)
        same = same and torch.equal(out.tokens, expected)
    # generate's max_batch: 0 used to mean "all at once" silently; negative crashed obscurely
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="max_batch"):
            generate(model, prompts, max_new_tokens=NEW, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB,
                     params=SamplingParams(), generator=torch.Generator(),
                     max_batch=bad)  # fmt: skip
    return same


def _tp_world():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def _check(results):
    r = results[0]
    for other in results[1:]:  # every TP rank returns the same rollouts
        for a, b in zip(r[: len(PARAMS)], other[: len(PARAMS)]):
            assert torch.equal(a["tokens"], b["tokens"])
    for res in r[: len(PARAMS)]:
        lens = res["lens"]
        # length-skewed: most responses end early, some run to the limit
        assert lens.median() <= NEW // 2 and (lens == NEW).any(), lens
        # continuous batching runs fewer rows than chunks without compaction would
        s = res["stats"]
        assert s["continuous"]["decode_rows"] < s["unbatched"]["steps"] * len(lens)
    assert all(res[-1] is True for res in results)  # the fallback gave the same tokens


def test_continuous_batching_equals_unbatched_tp2():
    """TP 2 (the collectives of refills and decode steps must pair up across ranks)."""
    _check(run_distributed(_worker, 2, timeout=300))


def test_continuous_batching_equals_unbatched_tp1():
    _check(run_distributed(_worker, 1, timeout=300))


def test_max_decode_batch_key_reaches_the_trainer():
    """``rollout.max_decode_batch`` is validated (>= 1 or null) and is the trainer's decode
    batch (the ``max_batch`` of its rollout and evaluation ``generate`` calls)."""
    from pathlib import Path

    from megatron_eaopd.config import ConfigError, load_config
    from megatron_eaopd.trainer.loop import Trainer

    path = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    assert Trainer(load_config(path)).max_decode_batch is None
    assert Trainer(load_config(path, ["rollout.max_decode_batch=4"])).max_decode_batch == 4
    with pytest.raises(ConfigError, match="max_decode_batch"):
        load_config(path, ["rollout.max_decode_batch=0"])
