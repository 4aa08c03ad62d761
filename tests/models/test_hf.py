"""Hugging Face models in and out: logits and greedy rollouts equal transformers' at every layout.

Tiny random HF models are made locally with transformers (all weights random, norms included):
Qwen3 tied and untied (head_dim 128 != hidden / heads), Qwen2 with q/k/v biases, Llama 3.1 with
"llama3" RoPE scaling whose parameters scale the frequencies at the tested positions. One
4-process gloo launch runs the layouts (tp, pp) = (1, 1), (2, 1), (1, 2), (2, 2) in turn: each
model is built from model_config_from_hf and loaded with load_hf_weights; its fp32 logits (all
layouts), fp64 logits ((1, 1) and (2, 1)) and 32-token greedy rollouts of rollout.generate ((1, 1)
and (2, 2)) are compared with transformers' forward and generate(do_sample=False). At (2, 2)
every model is exported with save_hf_weights and reloaded by transformers with no missing or
unexpected keys and bit-identical weights.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from tests.dist import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FP64_LAYOUTS = [(1, 1), (2, 1)]  # pipeline schedules return fp32 logits
GENERATE_LAYOUTS = [(1, 1), (2, 2)]
SEQ, NEW_TOKENS, EOS = 24, 32, 7
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # wavelengths of head_dim 16 at theta 5e5: 6.3 (kept), 32 (smoothed), >= 167 (divided)
    "original_max_position_embeddings": 64,
}


def hf_config(kind: str, num_layers: int = 2):
    """A tiny transformers config of `kind` (qwen3_tied, qwen3_untied, qwen2, llama31)."""
    common = dict(COMMON, num_hidden_layers=num_layers)
    if kind.startswith("qwen3"):
        return transformers.Qwen3Config(
            vocab_size=300, head_dim=128, rope_theta=1e6,
            tie_word_embeddings=kind == "qwen3_tied", **common,
        )  # fmt: skip
    if kind == "qwen2":
        return transformers.Qwen2Config(vocab_size=333, rope_theta=1e4, **common)
    if kind == "llama31":
        return transformers.LlamaConfig(
            vocab_size=320, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE),
            tie_word_embeddings=False, **common,
        )  # fmt: skip
    raise ValueError(kind)


def make_hf_model(path: str, kind: str, seed: int = 0, max_shard_size=None, num_layers: int = 2):
    """Save a random float32 HF model of `kind` to `path` (safetensors); return it (eval)."""
    config = hf_config(kind, num_layers)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.randn(p.shape, generator=gen) * 0.15
            p.copy_(value + 1.0 if "norm" in name else value)
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


def tokens_and_prompts(vocab: int):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=gen)
    prompts = [torch.randint(8, vocab, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    return tokens, prompts


def _fp64_norms():
    """HF RMSNorms compute in fp32 even for fp64 inputs; the fp64 reference keeps fp64."""

    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    classes = [
        transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm,
        transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm,
        transformers.models.llama.modeling_llama.LlamaRMSNorm,
    ]
    return [(cls, cls.forward) for cls in classes], forward


@torch.no_grad()
def hf_reference(model, vocab: int) -> dict:
    """fp32 and fp64 logits [2, SEQ, vocab] and greedy continuations of the prompts."""
    tokens, prompts = tokens_and_prompts(vocab)
    out = {"logits": model(tokens).logits, "generated": []}
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=EOS, pad_token_id=0,
        )[0, len(p):].tolist()  # fmt: skip
        out["generated"].append(seq[: seq.index(EOS) + 1] if EOS in seq else seq)
    saved, forward = _fp64_norms()
    for cls, _ in saved:
        cls.forward = forward
    try:
        out["logits64"] = model.double()(tokens).logits
    finally:
        for cls, original in saved:
            cls.forward = original
        model.float()
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for kind in ("qwen3_tied", "qwen3_untied", "qwen2", "llama31"):
        path = str(root / kind)
        # one model in several shards (model.safetensors.index.json)
        model = make_hf_model(path, kind, max_shard_size="200KB" if kind == "qwen2" else None)
        models[kind] = {
            "path": path,
            "model": model,
            "ref": hf_reference(model, model.config.vocab_size),
        }
    return models


def _project_outputs(path, dtype, generate_too):
    """Logits (and greedy rollouts) of the HF model at `path` under the current layout."""
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.hf import load_hf_weights, model_config_from_hf
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.rollout import SamplingParams, generate
    from megatron_eaopd.rollout.sampling import gather_vocab_logits

    cfg = model_config_from_hf(path, params_dtype=dtype)
    chunks = build_model(cfg)
    assert not load_hf_weights(chunks, path).differences(cfg)
    tokens, prompts = tokens_and_prompts(cfg.vocab_size)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    out = {}
    if dtype == "float64":  # a direct forward (PP 1): the schedule's logits are fp32
        with torch.no_grad():
            out["logits"] = _gather64(chunks[0](tokens, pos, None), cfg.vocab_size)
    else:
        scored = FrozenTeacher(chunks).score([{"tokens": tokens, "position_ids": pos}], SEQ, 2)
        if ps.is_pipeline_last_stage():  # [s, b, V_pad / tp] -> [b, s, V]
            out["logits"] = gather_vocab_logits(scored[0].transpose(0, 1), cfg.vocab_size)
    if generate_too:
        batch = generate(
            chunks, prompts, max_new_tokens=NEW_TOKENS, eos_id=EOS, pad_id=0,
            vocab_size=cfg.vocab_size, params=SamplingParams(top_k=1),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        out["generated"] = [batch.response_ids(i) for i in range(len(prompts))]
    return cfg, chunks, out


def _gather64(logits, vocab):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab]


def _failing_export(chunks, export_root: str) -> list:
    """Rank 0's disk fills up at the first of several shards, then (a second export) rank 1
    fails casting its blocks of the second shard: every rank must raise (not block in a send or
    a receive) and no folder may be left. Returns the errors each rank saw, the folder's
    listing and the number of shard writes rank 0 tried."""
    import torch.distributed as dist

    from megatron_eaopd.models.hf import save

    write, calls = save._write_safetensors, [0]

    def full_disk(tensors, path):
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(28, "No space left on device")
        write(tensors, path)

    prepare, prepared = save._prepare_shard, [0]

    def out_of_memory(*args):
        prepared[0] += 1
        if prepared[0] == 2:
            raise RuntimeError("out of memory (simulated)")
        return prepare(*args)

    errors = []

    def export_with(name, failing, on_rank):
        """One export with ``save.<name>`` replaced by ``failing`` on rank ``on_rank``."""
        original = getattr(save, name)
        if dist.get_rank() == on_rank:
            setattr(save, name, failing)
        try:
            save.save_hf_weights(chunks, os.path.join(export_root, "full"), dtype="fp32",
                                 max_shard_bytes=100_000)  # fmt: skip
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            setattr(save, name, original)

    export_with("_write_safetensors", full_disk, on_rank=0)
    # rank 1 (a sender) fails casting its blocks of the second shard: nobody waits in a send
    export_with("_prepare_shard", out_of_memory, on_rank=1)
    return [errors, sorted(os.listdir(export_root)), calls[0]]


def layouts_worker(rank, world, models: dict, export_root: str):
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.hf import save_hf_weights
    from megatron_eaopd.parallel.init import initialize_parallel

    results = {}
    for tp, pp in LAYOUTS:
        layout = initialize_parallel(tp, pp, seed=1)
        reporter = layout.is_last_stage and layout.dp_rank == 0 and layout.tp_rank == 0
        for kind, path in models.items():
            generate_too = (tp, pp) in GENERATE_LAYOUTS
            cfg, chunks, out = _project_outputs(path, "float32", generate_too)
            if (tp, pp) in FP64_LAYOUTS:
                out["logits64"] = _project_outputs(path, "float64", False)[2].get("logits")
            if reporter:
                results[(tp, pp, kind)] = out
            if (tp, pp) == (2, 2):
                # export from TP2 x PP2; the DP replicas take part too
                save_hf_weights(chunks, os.path.join(export_root, kind), dtype="fp32",
                                max_shard_bytes=300_000)  # fmt: skip
                if kind == "qwen2":
                    results["failed export"] = _failing_export(chunks, export_root)
        assert ps.get_tensor_model_parallel_world_size() == tp
    return results


def test_hf_models_match_transformers_at_every_layout(hf_models, tmp_path):
    paths = {kind: m["path"] for kind, m in hf_models.items()}
    export_root = str(tmp_path / "export")
    os.makedirs(export_root)
    results = {}
    failed = []
    for r in run_distributed(layouts_worker, 4, paths, export_root, timeout=400):
        failed.append(r.pop("failed export"))
        results.update(r)
    # the export that fails on rank 0's first shard: all 4 ranks raised, nothing left behind
    assert failed[0][2] == 1, failed  # rank 0 stopped at the first of several shards
    for errors, listing, _ in failed:
        assert len(errors) == 2 and "No space left on device" in errors[0], errors
        assert "rank 0: OSError" in errors[0], errors
        assert "rank 1: RuntimeError: out of memory (simulated)" in errors[1], errors
        assert not any(name.startswith("full") for name in listing), listing
    diffs = {}
    for (tp, pp, kind), out in sorted(results.items()):
        ref = hf_models[kind]["ref"]
        diff = (out["logits"] - ref["logits"]).abs().max().item()
        diffs[(kind, tp, pp, "fp32")] = diff
        assert diff < 1e-4, (kind, tp, pp, diff)
        if (tp, pp) in GENERATE_LAYOUTS:
            assert out["generated"] == ref["generated"], (kind, tp, pp)
        if "logits64" in out:
            diff64 = (out["logits64"] - ref["logits64"]).abs().max().item()
            diffs[(kind, tp, pp, "fp64")] = diff64
            assert out["logits64"].dtype == torch.float64
            assert diff64 < 1e-10, (kind, tp, pp, diff64)
    assert len(results) == len(LAYOUTS) * len(hf_models)
    print("max |logit diff| vs transformers:", {k: f"{v:.1e}" for k, v in diffs.items()})

    # export from TP2 x PP2 reloads in transformers with the same weights, bit for bit
    for kind, m in hf_models.items():
        out_dir = os.path.join(export_root, kind)
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
        assert not [n for n in os.listdir(export_root) if ".tmp-" in n]
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, output_loading_info=True
        )
        assert type(reloaded) is type(m["model"])
        assert not any(info.values()), info  # missing / unexpected / mismatched keys
        original = m["model"].state_dict()
        exported = reloaded.state_dict()
        assert exported.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(exported[key], value), key
        assert reloaded.config.tie_word_embeddings == m["model"].config.tie_word_embeddings


def test_llama3_scaling_changes_the_tested_logits(hf_models):
    """Without its RoPE scaling the Llama 3.1 model gives other logits at these positions."""
    m = hf_models["llama31"]
    config = hf_config("llama31")
    config.rope_scaling = None
    config.rope_parameters = {"rope_type": "default", "rope_theta": 5e5}
    plain = transformers.LlamaForCausalLM(config).eval()
    plain.load_state_dict(m["model"].state_dict())
    tokens, _ = tokens_and_prompts(config.vocab_size)
    with torch.no_grad():
        diff = (plain(tokens).logits - m["ref"]["logits"]).abs().max().item()
    assert diff > 1e-2, diff
