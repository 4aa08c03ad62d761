"""eaopd-convert and recorded model configs: import, load at another layout, export, bad input.

One 2-process gloo launch: `eaopd-convert import-hf` (fp32 and bf16), the checkpoint loads at TP 2
with logits equal to transformers', a bf16 checkpoint loads into an fp32 model, a model of
another shape is refused with the differing field named, a checkpoint without a recorded config
still loads; load_hf_weights and save_hf_weights at PP 2 x VPP 2; `export-hf` from TP 2 (fp32)
and TP 1 (bf16, with the tokenizer). Every export reloads in transformers with the original
weights bit for bit. Bad input exits with status 2 before any
process group, leaving no output.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

from megatron_eaopd import convert
from megatron_eaopd.models import ModelConfig
from megatron_eaopd.models.hf import hf_config_dict, model_config_from_hf
from tests.dist import run_distributed
from tests.models.test_hf import SEQ, make_hf_model, tokens_and_prompts


def _tokenizer(path: str, vocab: int) -> None:
    """A WordLevel tokenizer over `vocab` ids with a chat template, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "qwen3")
    model = make_hf_model(path, "qwen3_untied", num_layers=4)  # 4 layers: PP 2 x VPP 2
    _tokenizer(path, model.config.vocab_size)
    tokens, _ = tokens_and_prompts(model.config.vocab_size)
    with torch.no_grad():
        logits = model(tokens).logits
    return {"path": path, "model": model, "logits": logits}


def _logits(chunks, vocab):
    from megatron_eaopd.rollout.sampling import gather_vocab_logits

    tokens, _ = tokens_and_prompts(vocab)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return gather_vocab_logits(chunks[0](tokens, pos, None), vocab)


def convert_worker(rank, world, hf_dir, root):
    import torch.distributed as dist

    from megatron_eaopd.models import build_model
    from megatron_eaopd.models.checkpoint import load_checkpoint, read_model_config
    from megatron_eaopd.parallel.init import initialize_parallel

    ckpt, ckpt16 = os.path.join(root, "ckpt"), os.path.join(root, "ckpt16")
    if rank == 0:  # a folder of the user's with the name import-hf's temporary folder once had
        os.makedirs(f"{ckpt}.tmp-import")
        with open(os.path.join(f"{ckpt}.tmp-import", "notes.txt"), "w") as f:
            f.write("mine")
    # TP 1 x DP 2 (every rank reads the whole model)
    assert convert.main(["import-hf", "--hf", hf_dir, "--out", ckpt, "--dtype", "fp32"]) == 0
    assert convert.main(["import-hf", "--hf", hf_dir, "--out", ckpt16, "--dtype", "bf16"]) == 0
    cfg, source = read_model_config(ckpt)
    assert source == f"hf:{os.path.abspath(hf_dir)}"
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.params_dtype == "float32"
    out = {"cfg": cfg.to_dict()}

    initialize_parallel(2, 1, seed=3)
    chunks = build_model(cfg)
    load_checkpoint(ckpt, chunks, load_rng=False)
    out["logits_tp2"] = _logits(chunks, cfg.vocab_size)
    chunks16 = build_model(cfg)  # fp32 model, bf16 checkpoint
    load_checkpoint(ckpt16, chunks16, load_rng=False)
    out["logits_bf16"] = _logits(chunks16, cfg.vocab_size)

    other = build_model(cfg.with_changes(rotary_base=1e4, layernorm_epsilon=1e-5))
    try:
        load_checkpoint(ckpt, other, load_rng=False)
    except ValueError as exc:
        out["refused"] = str(exc)

    # a checkpoint saved before configs were recorded still loads
    dist.barrier()
    meta_path = os.path.join(ckpt16, "iter_0000000", "eaopd_meta.json")
    if rank == 0:
        with open(meta_path) as f:
            meta = json.load(f)
        meta.pop("model_config")
        meta.pop("source")
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    dist.barrier()
    load_checkpoint(ckpt16, build_model(cfg), load_rng=False)

    # interleaved pipeline (PP 2 x VPP 2: layers 0 and 2 on rank 0): load and export directly
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.hf import load_hf_weights, save_hf_weights
    from megatron_eaopd.models.teacher import FrozenTeacher
    from megatron_eaopd.rollout.sampling import gather_vocab_logits

    initialize_parallel(1, 2, 2, seed=3)
    vchunks = build_model(cfg)
    load_hf_weights(vchunks, hf_dir)
    tokens, _ = tokens_and_prompts(cfg.vocab_size)
    pos = torch.arange(SEQ).unsqueeze(0)
    batches = [{"tokens": tokens[i : i + 1], "position_ids": pos} for i in range(2)]
    scored = FrozenTeacher(vchunks).score(batches, SEQ, 1)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits = torch.cat([t.transpose(0, 1) for t in scored])  # [2, s, V_pad]
        out["logits_vpp"] = gather_vocab_logits(logits, cfg.vocab_size)
    save_hf_weights(vchunks, os.path.join(root, "outvpp"), dtype="fp32")

    args = ["export-hf", "--checkpoint", ckpt, "--dtype", "fp32", "--max-shard-gb", "0.0002"]
    assert convert.main(args + ["--out", os.path.join(root, "out32"), "--tp", "2"]) == 0
    args = ["export-hf", "--checkpoint", ckpt, "--dtype", "bf16", "--tokenizer", hf_dir]
    assert convert.main(args + ["--out", os.path.join(root, "out16")]) == 0
    return out


def test_import_load_export_round_trip(qwen3, tmp_path):
    root = str(tmp_path)
    results = run_distributed(convert_worker, 2, qwen3["path"], root, timeout=300)
    out = results[0]
    logits_vpp = [r["logits_vpp"] for r in results if "logits_vpp" in r]
    assert len(logits_vpp) == 1 and (logits_vpp[0] - qwen3["logits"]).abs().max() < 1e-4
    assert ModelConfig.from_dict(out["cfg"]) == model_config_from_hf(
        qwen3["path"], params_dtype="float32"
    )
    assert (out["logits_tp2"] - qwen3["logits"]).abs().max() < 1e-4
    assert (out["logits_bf16"] - qwen3["logits"]).abs().max() < 0.1  # bf16 weights
    assert "rotary_base" in out["refused"] and "layernorm_epsilon" in out["refused"]
    assert [n for n in os.listdir(root) if ".tmp-" in n] == ["ckpt.tmp-import"]  # the user's
    assert os.listdir(os.path.join(root, "ckpt.tmp-import")) == ["notes.txt"]
    # every export is marked as one (a later export may replace it, nothing else)
    with open(os.path.join(root, "out16", "eaopd_export.json")) as f:
        marker = json.load(f)
    assert marker["checkpoint"] == os.path.join(root, "ckpt", "iter_0000000")
    assert marker["dtype"] == "bfloat16" and marker["architecture"] == "Qwen3ForCausalLM"
    assert os.path.isfile(os.path.join(root, "outvpp", "eaopd_export.json"))

    original = qwen3["model"].state_dict()
    for name, dtype in (
        ("out32", torch.float32),
        ("out16", torch.bfloat16),
        ("outvpp", torch.float32),
    ):
        path = os.path.join(root, name)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True
        )
        assert not any(info.values()), info
        exported = model.state_dict()
        assert exported.keys() == original.keys()
        for key, value in original.items():
            assert exported[key].dtype == dtype
            assert torch.equal(exported[key], value.to(dtype)), (name, key)
    assert os.path.isfile(os.path.join(root, "out32", "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(root, "out16", "generation_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(root, "out16"))
    assert tok.eos_token == "</s>" and tok.chat_template
    # without --tokenizer: the folder it was imported from (was: no tokenizer, no EOS id)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(root, "out32"))
    source = transformers.AutoTokenizer.from_pretrained(qwen3["path"])
    assert tok.eos_token == "</s>" and tok.get_vocab() == source.get_vocab()


def test_an_export_without_a_tokenizer_takes_the_one_the_checkpoint_was_made_with(
    tmp_path, caplog, monkeypatch
):
    """export-hf without --tokenizer wrote no tokenizer and no EOS id (generate() never
    stopped). An import takes its source folder's; a trainer save the run's tokenizer.path
    (config.yaml beside checkpoints/: with kind auto the teacher's, not the student folder its
    weights came from, whose EOS and template differ), a relative one also from the run's
    ancestors; neither: a warning."""
    import yaml

    caplog.set_level("INFO", logger="eaopd-convert")
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    for folder in (student, teacher):
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text("{}")
    imported = {"source": f"hf:{student}", "extra": {"hf": {"token_ids": {"eos_token_id": 2}}}}
    ckpt = str(tmp_path / "imp" / "iter_0000000")
    assert convert._source_tokenizer(imported, ckpt) == str(student)
    run = tmp_path / "runs" / "r"
    iteration = str(run / "checkpoints" / "iter_0000004")
    saved = {"source": f"hf:{student}"}  # a trainer save: the student folder's weights
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"tokenizer": {"kind": "huggingface", "path": "teacher"}}))  # fmt: skip
    monkeypatch.chdir(run)  # the export runs elsewhere than the training: relative, found above
    assert convert._source_tokenizer(saved, iteration) == str(tmp_path / "teacher")
    assert "the run's tokenizer.path" in caplog.text
    # a save that records its config and output folder: from those, wherever the checkpoint
    # lies (training.checkpoint_dir elsewhere, an iter_* folder copied into another run) and
    # whatever the export's working folder holds (a decoy "teacher" there is not taken)
    recorded = dict(saved, extra={"output_dir": str(run), "config": {
        "training": {"output_dir": "runs/r"}, "tokenizer": {"kind": "huggingface",
                                                            "path": "teacher"}}})  # fmt: skip
    decoy = tmp_path / "elsewhere"
    (decoy / "teacher").mkdir(parents=True)
    (decoy / "teacher" / "tokenizer_config.json").write_text("{}")
    monkeypatch.chdir(decoy)
    copied = str(tmp_path / "scratch" / "other-run" / "iter_0000004")
    assert convert._source_tokenizer(recorded, copied) == str(teacher)
    caplog.clear()
    (run / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"kind": "task"}}))
    assert convert._source_tokenizer(saved, iteration) is None
    assert "no --tokenizer: the export holds no tokenizer files and config.json no BOS" in (
        caplog.text)  # fmt: skip
    caplog.clear()
    (student / "tokenizer_config.json").unlink()
    assert convert._source_tokenizer(imported, ckpt) is None
    assert f"the folder it was imported from, {student}, holds none" in caplog.text
    assert "generate() will not stop" not in caplog.text  # the import recorded its ids


# ---------------------------------------------------------------- bad input: exit 2, no output


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(data, f)


def _break(kind: str, path: str) -> str:
    """Damage the HF folder `path` in one way; return a word the error must contain."""
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if kind == "moe":
        _edit_config(path, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
        return "model_type"
    if kind == "yarn":
        rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
        _edit_config(path, rope_parameters=rope)
        return "rope_type"
    if kind == "gelu":
        _edit_config(path, hidden_act="gelu")
        return "hidden_act"
    if kind == "sliding":
        _edit_config(path, use_sliding_window=True)
        return "use_sliding_window"
    if kind == "no_config":
        os.remove(os.path.join(path, "config.json"))
        return "config.json"
    if kind == "missing_shard":
        os.remove(os.path.join(path, shards[-1]))
        return shards[-1]
    if kind == "truncated_shard":
        with open(os.path.join(path, shards[0]), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(path, shards[0])) - 100)
        return "truncated"
    if kind == "pickle":
        for name in os.listdir(path):
            if "safetensors" in name:
                os.remove(os.path.join(path, name))
        torch.save({"x": torch.zeros(1)}, os.path.join(path, "pytorch_model.bin"))
        return "trust"
    raise ValueError(kind)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "llama")
    make_hf_model(path, "llama31", max_shard_size="200KB")
    return path


@pytest.mark.parametrize(
    "kind",
    ["moe", "yarn", "gelu", "sliding", "no_config", "missing_shard", "truncated_shard", "pickle"],
)
def test_import_bad_input_exits_2_without_output(kind, sharded_llama, tmp_path, capsys):
    import torch.distributed as dist

    hf = str(tmp_path / "hf")
    shutil.copytree(sharded_llama, hf)
    word = _break(kind, hf)
    out = str(tmp_path / "ckpt")
    assert convert.main(["import-hf", "--hf", hf, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "error" in err and word in err, err
    assert not dist.is_initialized()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no temporary folder


def _fake_checkpoint(root: str, cfg: ModelConfig | None) -> None:
    """A checkpoint root whose meta records `cfg` (export-hf reads the meta before any work)."""
    path = os.path.join(root, "iter_0000000")
    os.makedirs(path)
    meta = {"iteration": 0, "layout": {}, "model_config": cfg and cfg.to_dict()}
    with open(os.path.join(path, "eaopd_meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000000\n")


def test_export_bad_input_exits_2_without_output(sharded_llama, tmp_path, capsys):
    llama = model_config_from_hf(sharded_llama)
    cases = [
        # a checkpoint of another shape than the HF config given for it
        (llama.with_changes(num_layers=4, hidden_size=128), ["--hf-config", sharded_llama],
         "num_layers"),
        (None, [], "records no model config"),
        (llama, ["--architecture", "MistralForCausalLM"], "MistralForCausalLM"),
        (llama.with_changes(qk_layernorm=True), ["--architecture", "LlamaForCausalLM"],
         "qk_layernorm"),
    ]  # fmt: skip
    for i, (cfg, extra, word) in enumerate(cases):
        root = str(tmp_path / f"ckpt{i}")
        _fake_checkpoint(root, cfg)
        out = str(tmp_path / f"out{i}")
        assert convert.main(["export-hf", "--checkpoint", root, "--out", out] + extra) == 2
        err = capsys.readouterr().err
        assert word in err, err
        assert not os.path.exists(out)
    # an existing, non-empty output is refused too
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "x").write_text("x")
    args = ["export-hf", "--checkpoint", str(tmp_path / "ckpt2"), "--out", str(tmp_path / "taken")]
    assert convert.main(args) == 2
    assert "exists" in capsys.readouterr().err
    # --iteration picks from a root: with one checkpoint folder it is refused, not ignored
    one = str(tmp_path / "ckpt2" / "iter_0000000")
    args = ["export-hf", "--checkpoint", one, "--iteration", "3", "--out", str(tmp_path / "o")]
    assert convert.main(args) == 2
    assert "is one checkpoint folder" in capsys.readouterr().err
    # a --checkpoint that does not exist: named as export-hf's input (was trainer wording)
    args = ["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert convert.main(args) == 2
    assert "--checkpoint" in (err := capsys.readouterr().err) and "no such folder" in err
    # --tokenizer: a sentencepiece .model file, or a folder without HF tokenizer files (the
    # task tokenizer's cache), exit 2 before anything loads, saying what to pass
    spm = tmp_path / "spm-0.model"
    spm.write_bytes(b"x")
    for tok, word in ((spm, "is a file, not a folder"), (tmp_path, "holds none of")):
        args = ["export-hf", "--checkpoint", str(tmp_path / "ckpt2"), "--out",
                str(tmp_path / "o"), "--tokenizer", str(tok)]  # fmt: skip
        assert convert.main(args) == 2
        err = capsys.readouterr().err
        assert word in err and "pass a Hugging Face tokenizer folder" in err, err


# ---------------------------------------------------------------- config.json mapping


def test_model_config_from_hf_fields(sharded_llama, tmp_path):
    cfg = model_config_from_hf(sharded_llama)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.rope_scaling == "llama3"
    assert (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (
        8.0,
        1.0,
        4.0,
    )
    assert cfg.rope_original_max_position_embeddings == 64 and cfg.rotary_base == 5e5
    assert cfg.params_dtype == "float32" and not cfg.qk_layernorm and not cfg.add_qkv_bias
    # the transformers 4 spelling (rope_theta + rope_scaling with "type") reads the same
    hf = str(tmp_path / "v4")
    shutil.copytree(sharded_llama, hf)
    rope = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    _edit_config(hf, rope_parameters=None, rope_theta=5e5, rope_scaling=rope)
    assert model_config_from_hf(hf) == cfg
    with pytest.raises(ValueError, match="no config.json"):  # also a FileNotFoundError
        model_config_from_hf(str(tmp_path))
    # written back as config.json and read again: the same model
    out = str(tmp_path / "back")
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype="float32"), f)
    assert model_config_from_hf(out) == cfg
    for changes, field in (
        ({"num_experts": 8}, "num_experts"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ):
        _edit_config(hf, **changes)
        with pytest.raises(ValueError, match=field):
            model_config_from_hf(hf)
        _edit_config(hf, **{k: None for k in changes}, rope_scaling=rope)
    # a field every config gives, removed or not a count: named (was a KeyError traceback)
    for value in (None, "96", 0):
        _edit_config(hf, intermediate_size=value)
        with pytest.raises(ValueError, match=r"config.json: intermediate_size missing or not a"):
            model_config_from_hf(hf)


def test_llama3_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_eaopd.models.builder import llama3_inv_freq

    config = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=4, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 128
    plain = 1.0 / (5e5 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ours = llama3_inv_freq(plain, 8.0, 1.0, 4.0, 8192)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, plain)


def test_transformer_engine_names_map_like_local_ones():
    from megatron_eaopd.models.hf.layout import param_pieces

    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=128,
        ffn_hidden_size=96, vocab_size=300, qk_layernorm=True,
    )  # fmt: skip
    layers = {0: 2}  # chunk-local layer 0 is global layer 2 (PP / VPP offset)
    for te, local, hf in (
        ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight",
         "input_layernorm.weight"),
        ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight",
         "post_attention_layernorm.weight"),
    ):  # fmt: skip
        a = param_pieces(f"decoder.layers.0.{te}", (64,), cfg, 1, 2, layers)
        b = param_pieces(f"decoder.layers.0.{local}", (64,), cfg, 1, 2, layers)
        assert a == b and a[0][0].hf_key == f"model.layers.2.{hf}"
    # grouped QKV at TP 2, rank 1: group 1 = q heads 2, 3, then k head 1, then v head 1
    pieces, _ = param_pieces(
        "decoder.layers.0.self_attention.linear_qkv.weight", (512, 64), cfg, 1, 2, layers
    )
    assert [(p.hf_key.split(".")[-2], p.hf_index[0], p.local_index[0]) for p in pieces] == [
        ("q_proj", (256, 512), (0, 256)),
        ("k_proj", (128, 256), (256, 384)),
        ("v_proj", (128, 256), (384, 512)),
    ]
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        param_pieces("decoder.layers.0.mlp.linear_fc1.bias", (96,), cfg, 0, 2, layers)
    with pytest.raises(ValueError, match="shape"):
        param_pieces("decoder.layers.0.mlp.linear_fc2.weight", (64, 96), cfg, 0, 2, layers)


def test_model_config_differences():
    a = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300
    )
    assert a.differences(a.with_changes(params_dtype="bfloat16", max_sequence_length=9)) == []
    diffs = a.differences(a.with_changes(rotary_base=5e5, num_query_groups=2))
    assert [d.split(":")[0] for d in diffs] == ["num_query_groups", "rotary_base"]
    # padding knobs matter only through the padded vocabulary they give
    assert a.differences(a.with_changes(make_vocab_size_divisible_by=4)) != []
    assert a.with_changes(vocab_pad_for_tp=8).padded_vocab_size(1) == 1024
    assert a.with_changes(vocab_pad_for_tp=8).padded_vocab_size(2) == 1024


def test_folders_that_would_load_another_model_are_refused(tmp_path):
    """check_hf_folder (every load, and the trainer before any compute): a tied config whose
    weights also store a different lm_head (transformers keeps that head untied), and a folder
    with both one model.safetensors and a sharded index (transformers reads the former)."""
    from safetensors.torch import load_file, save_file

    from megatron_eaopd.models.hf import check_hf_folder

    tied = str(tmp_path / "tied")
    model = make_hf_model(tied, "qwen3_tied")
    check_hf_folder(tied)  # as saved: no stored head, or the embedding's
    path = os.path.join(tied, "model.safetensors")
    tensors = load_file(path)
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.clone()}, path, metadata={"format": "pt"})
    check_hf_folder(tied)  # a stored copy of the embedding: the same model
    # a head trained apart from the embedding (e.g. a fine-tune that untied them)
    head = embed + 1e-3 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
    save_file({**tensors, "lm_head.weight": head}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"differs from model.embed_tokens.weight \(row 0\)"):
        check_hf_folder(tied)
    # what transformers does with that folder: the stored head, untied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    assert torch.equal(loaded.lm_head.weight, head) and not torch.equal(head, embed)
    del model, loaded

    both = str(tmp_path / "both")
    make_hf_model(both, "qwen3_untied", max_shard_size="200KB")
    assert os.path.isfile(os.path.join(both, "model.safetensors.index.json"))
    shutil.copy(path, os.path.join(both, "model.safetensors"))  # a stale single file
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.ind"):
        check_hf_folder(both)


def _imported_teacher_worker(rank, world, hf_dir, root, config):
    from megatron_eaopd.config import load_config
    from megatron_eaopd.config.hf_models import recorded_tokenizer, tokenizer_fingerprint
    from megatron_eaopd.parallel.init import destroy_parallel, use_layout
    from megatron_eaopd.trainer.build import build_teacher, init_layouts, model_configs

    ckpt = os.path.join(root, "ckpt")
    assert convert.main(["import-hf", "--hf", hf_dir, "--out", ckpt, "--dtype", "fp32"]) == 0
    # the folder's tokenizer, recorded: the trainer compares it when the folder is gone
    assert recorded_tokenizer(ckpt) == tokenizer_fingerprint(hf_dir) is not None
    overrides = [f"model.teacher_checkpoint={ckpt}", "parallel.teacher.tp=2",
                 "parallel.backend=gloo"]  # fmt: skip
    cfg = load_config(config, overrides)
    # tokenizer.kind auto: the folder the checkpoint was imported from (its embeddings' ids)
    assert (cfg.tokenizer.kind, cfg.tokenizer.path) == ("huggingface", os.path.abspath(hf_dir))
    shape = (cfg.model.teacher.layers, cfg.model.teacher.hidden, cfg.model.teacher.vocab_size)
    try:  # a shape key the user gives must agree with the checkpoint's
        load_config(config, [*overrides, "model.teacher.hidden=128"])
        disagreement = None
    except ValueError as err:
        disagreement = str(err)
    init_layouts(cfg)
    try:
        _, teacher_cfg = model_configs(cfg, vocab_size=64)
        teacher = build_teacher(teacher_cfg, ckpt)
        with use_layout("teacher"):
            logits = _logits(teacher.chunks, teacher_cfg.vocab_size)
    finally:
        destroy_parallel()
    return {"shape": shape, "disagreement": disagreement, "cfg": teacher_cfg.to_dict(),
            "logits": logits}  # fmt: skip


def test_an_imported_checkpoint_is_a_trainer_model_source(tmp_path):
    """model.teacher_checkpoint=<an eaopd-convert import-hf output> with no shape keys: the
    shape, the q/k/v biases (Qwen2) and the import's vocabulary padding come from the config it
    records, and the teacher loads at TP 2 with transformers' logits. It used to be refused (the
    YAML-derived model had another padded vocabulary and no biases)."""
    hf = str(tmp_path / "qwen2")
    model = make_hf_model(hf, "qwen2")
    _tokenizer(hf, model.config.vocab_size)
    tokens, _ = tokens_and_prompts(model.config.vocab_size)
    with torch.no_grad():
        want = model(tokens).logits
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "base.yaml")
    results = run_distributed(_imported_teacher_worker, 2, hf, str(tmp_path), config)
    r = results[0]
    assert r["shape"] == (2, 64, 333)
    assert "model.teacher.hidden" in r["disagreement"] and "recorded in" in r["disagreement"]
    assert r["cfg"]["add_qkv_bias"] and r["cfg"]["vocab_pad_for_tp"] == 8
    torch.testing.assert_close(r["logits"], want, atol=1e-4, rtol=1e-4)
